"""Export of a stage-2 result mesh: textured GLB and OBJ (+MTL+PNG) via :mod:`tsjax.export`.

The DMTet albedo field (sRGB) is baked into an xatlas UV atlas texture of ``texture_size`` texels
(the method notes' export: xatlas atlas + baked texture, 1024 px in the paper preset).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

__all__ = ["export_asset"]


def export_asset(out_dir: str | Path, verts: np.ndarray, faces: np.ndarray,
                 albedo_fn: Callable[[jnp.ndarray], jnp.ndarray], *, texture_size: int = 1024,
                 name: str = "model", backend: str = "auto") -> dict[str, Path]:
    """Write ``<name>.glb`` and ``<name>.obj`` (+ ``.mtl``, ``_albedo.png``) into ``out_dir``.

    ``verts`` [V,3] float32 (unit-cube world, +Y up), ``faces`` [F,3] int32 (CCW), ``albedo_fn(points
    [N,3]) -> sRGB [N,3]``. Returns ``{"glb": path, "obj": path}``.
    """
    from tsjax.export import export_glb, export_obj

    out = Path(out_dir)
    glb, obj = out / f"{name}.glb", out / f"{name}.obj"
    export_glb(glb, verts, faces, albedo_fn, texture_size, name=name, backend=backend)
    export_obj(obj, verts, faces, albedo_fn, texture_size, name=name, backend=backend)
    return {"glb": glb, "obj": obj}
