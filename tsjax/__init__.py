"""tsjax: ThemeStation (theme-aware 3D-to-3D generation, arXiv 2403.15383) in JAX/Flax.

Conventions shared by every module (world frame, cameras, image layout, normal maps, rasterizer
output) are in ``docs/conventions.md``. Entry points:

- ``python -m tsjax.optimize``  the whole pipeline (exemplars -> textured GLB + gallery)
- ``python -m tsjax.render``    render exemplar meshes (colour, normals, cameras, contact sheet)
"""
__version__ = "0.1.0"
