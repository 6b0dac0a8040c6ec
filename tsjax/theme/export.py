"""Export of a stage-2 result mesh: GLB and OBJ (+MTL) with the albedo field.

The albedo field is sampled at the vertices and stored per vertex with trimesh: glTF ``COLOR_0``
(linear, as glTF requires: the field's sRGB values are converted) and OBJ vertex colours (sRGB, the
common ``v x y z r g b`` extension).
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable

import jax.numpy as jnp
import numpy as np

__all__ = ["export_asset"]


def export_asset(out_dir: str | Path, verts: np.ndarray, faces: np.ndarray,
                 albedo_fn: Callable[[jnp.ndarray], jnp.ndarray], *, texture_size: int = 1024,
                 name: str = "model") -> dict[str, Path]:
    """Write ``<name>.glb`` and ``<name>.obj`` into ``out_dir``; returns ``{"glb": path, "obj": path}``.

    ``verts`` [V,3] float32 (unit-cube world, +Y up), ``faces`` [F,3] int32 (CCW), ``albedo_fn(points
    [N,3]) -> sRGB [N,3]``.
    """
    import trimesh

    from tsjax.render.shading import srgb_to_linear

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    verts = np.asarray(verts, np.float32)
    faces = np.asarray(faces, np.int64)
    srgb = np.clip(np.asarray(albedo_fn(jnp.asarray(verts))), 0.0, 1.0)
    lin = np.asarray(srgb_to_linear(jnp.asarray(srgb)))
    glb, obj = out / f"{name}.glb", out / f"{name}.obj"
    tm = trimesh.Trimesh(verts, faces, vertex_colors=(np.clip(lin, 0, 1) * 255 + 0.5).astype(np.uint8), process=False)
    tm.export(glb)
    tm_obj = trimesh.Trimesh(verts, faces, vertex_colors=(srgb * 255 + 0.5).astype(np.uint8), process=False)
    obj.write_text(trimesh.exchange.obj.export_obj(tm_obj, include_color=True))
    return {"glb": glb, "obj": obj}
