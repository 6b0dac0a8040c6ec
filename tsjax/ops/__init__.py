"""tsjax.ops."""
