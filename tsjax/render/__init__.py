"""tsjax.render."""
