"""lb (being written)."""
