"""tsjax.theme."""
