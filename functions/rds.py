"""rds (being written)."""
