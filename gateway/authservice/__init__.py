"""authservice."""
