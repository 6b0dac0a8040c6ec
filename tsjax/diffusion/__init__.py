"""tsjax.diffusion."""
