"""tsjax.data."""
