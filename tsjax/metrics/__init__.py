"""tsjax.metrics."""
