"""httpguard (being written)."""
