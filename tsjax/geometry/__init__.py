"""tsjax.geometry."""
