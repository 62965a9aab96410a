"""elasticsearch hook functions (being written)."""
