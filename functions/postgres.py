"""postgres hook functions (being written)."""
