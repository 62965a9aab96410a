"""cloudsql (being written)."""
