"""dns (being written)."""
