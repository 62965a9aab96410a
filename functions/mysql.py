"""mysql hook functions (being written)."""
