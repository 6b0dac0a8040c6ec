"""tsjax.guidance."""
