"""redis hook functions (being written)."""
