"""couchbase hook functions (being written)."""
