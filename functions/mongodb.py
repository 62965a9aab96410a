"""mongodb hook functions (being written)."""
