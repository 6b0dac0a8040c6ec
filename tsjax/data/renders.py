"""Exemplar renders: colour + normal images of every exemplar from orbit cameras.

Camera modes:
  * ``"paper"`` (default): the paper's exemplar renders, half the views at elevation 0 deg and half at
    20 deg (alternating), azimuth uniform in [-180, 180), perspective ``fovy`` (default 40 deg) at
    ``distance`` (default 2.2, the unit cube fills ~2/3 of the frame).
  * ``"ortho"``: the official code's orthographic renders (method notes: 30 views), azimuths evenly
    spaced over 360 deg starting at 0 (front), elevation alternating 0 / 20 deg, view volume half-height
    ``ortho_half_height`` (default 0.8 > the unit cube's half diagonal 0.707 in any horizontal view).
Each mesh gets its own cameras (key folded with the mesh index). Images follow docs/conventions.md
(sRGB colour, encoded world normals, white background by default).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.render.camera import Cameras, make_cameras
from tsjax.render.mesh_render import render_mesh

__all__ = ["exemplar_cameras", "render_exemplar_views"]


def exemplar_cameras(key, n_views: int, *, mode: str = "paper", distance: float = 2.2, fovy: float = 40.0,
                     ortho_half_height: float = 0.8, elevations=(0.0, 20.0)) -> tuple[Cameras, dict]:
    """Cameras for ``n_views`` exemplar renders (see module docstring). Returns ``(Cameras [n], params)``
    with params ``elevation, azimuth, distance, fovy`` ([n] float32 numpy; fovy is NaN for ortho) and
    ``ortho_half_height`` ([n]; NaN for perspective)."""
    if mode not in ("paper", "ortho"):
        raise ValueError(f"camera mode must be 'paper' or 'ortho', got {mode!r}")
    if n_views < 1:
        raise ValueError(f"number of views must be >= 1, got {n_views}")
    el = np.asarray([elevations[i % len(elevations)] for i in range(n_views)], np.float32)
    if mode == "paper":
        az = np.asarray(jax.random.uniform(key, (n_views,), jnp.float32, -180.0, 180.0))
        cams = make_cameras(el, az, distance, fovy=fovy)
        fov, hh = np.full(n_views, fovy, np.float32), np.full(n_views, np.nan, np.float32)
    else:
        az = (np.arange(n_views, dtype=np.float32) * 360.0 / n_views + 180.0) % 360.0 - 180.0
        cams = make_cameras(el, az, distance, ortho_half_height=ortho_half_height)
        fov, hh = np.full(n_views, np.nan, np.float32), np.full(n_views, ortho_half_height, np.float32)
    params = dict(elevation=el, azimuth=az.astype(np.float32), distance=np.full(n_views, distance, np.float32),
                  fovy=fov, ortho_half_height=hh)
    return cams, params


def render_exemplar_views(meshes, n_views: int, resolution: int, key, *, mode: str = "paper",
                          distance: float = 2.2, fovy: float = 40.0, ortho_half_height: float = 0.8,
                          background=(1.0, 1.0, 1.0), backend: str = "auto", progress=None) -> dict:
    """Render every mesh from its own ``n_views`` cameras.

    Args:
      meshes: list of M ``tsjax.data.mesh.Mesh``.
      n_views: N views per mesh; resolution: square image size in pixels; key: jax PRNG key.
      progress: optional callable ``progress(i)`` called after mesh i (e.g. a tqdm update).

    Returns (numpy): ``color [M,N,H,W,3]`` sRGB, ``normal [M,N,H,W,3]`` encoded, ``mask [M,N,H,W,1]``,
    ``cams`` = ``Cameras`` with ``c2w, proj [M,N,4,4]``, ``params`` = dict of [M,N] arrays
    (elevation, azimuth, distance, fovy, ortho_half_height).
    """
    if not meshes:
        raise ValueError("render_exemplar_views: no meshes given")
    out = dict(color=[], normal=[], mask=[], c2w=[], proj=[], params=[])
    for i, m in enumerate(meshes):
        cams, params = exemplar_cameras(jax.random.fold_in(key, i), n_views, mode=mode, distance=distance,
                                        fovy=fovy, ortho_half_height=ortho_half_height)
        r = render_mesh(m, cams, (resolution, resolution), background=background, backend=backend)
        for k in ("color", "normal", "mask"):
            out[k].append(np.asarray(r[k]))
        out["c2w"].append(np.asarray(cams.c2w)); out["proj"].append(np.asarray(cams.proj))
        out["params"].append(params)
        if progress is not None:
            progress(i)
    params = {k: np.stack([p[k] for p in out["params"]]) for k in out["params"][0]}
    return dict(color=np.stack(out["color"]), normal=np.stack(out["normal"]), mask=np.stack(out["mask"]),
                cams=Cameras(np.stack(out["c2w"]), np.stack(out["proj"])), params=params)
