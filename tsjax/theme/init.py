"""The initial 3D model of stage 2 and the DMTet fit to it.

Built-in init (no ``--init MESH``), ``method="nearest_exemplar"``: the paper lifts the concept image
with an image-to-3D network (Wonder3D), which is not available here. Instead

1. the concept image's foreground (pixels away from the white background) is compared with the
   silhouette of every exemplar rendered from the concept image's camera; the exemplar with the
   highest silhouette IoU is taken;
2. it is stretched anisotropically so that its silhouette's bounding box matches the concept's
   (width -> world X and Z, height -> world Y; ratios clipped to [0.6, 1.6]) and re-normalised into
   the unit cube. The init is thus the exemplar geometry closest to the concept, with the concept's
   proportions; stage 2 (concept + reference priors) then reshapes and repaints it.

The DMTet fields are fitted to the init mesh before stage 2: the SDF to the mesh's signed distance
(:func:`tsjax.geometry.dmtet.fit_sdf` with :func:`~tsjax.geometry.dmtet.mesh_sdf`), the albedo field to
the mesh's unlit colours back-projected from depth renders (L2, Adam).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsjax.data.mesh import Mesh, normalize
from tsjax.geometry.dmtet import DMTetConfig, albedo, fit_sdf, mesh_sdf
from tsjax.render.camera import Cameras, make_cameras
from tsjax.render.mesh_render import render_mesh

__all__ = ["silhouette_iou", "nearest_exemplar_init", "fit_dmtet_to_mesh", "backproject_colors"]


def silhouette_iou(a: np.ndarray, b: np.ndarray) -> float:
    """IoU of two boolean masks ``[H,W]``."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def _bbox(mask: np.ndarray) -> tuple[float, float] | None:
    rows, cols = np.nonzero(mask)
    if len(rows) == 0:
        return None
    return float(cols.max() - cols.min() + 1), float(rows.max() - rows.min() + 1)


def nearest_exemplar_init(exemplars: list[Mesh], concept_mask: np.ndarray, cams: Cameras, *, clip=(0.6, 1.6),
                          backend: str = "auto") -> tuple[Mesh, dict]:
    """Built-in init model (module docstring). ``concept_mask`` ``[H,W]`` bool, ``cams`` the concept camera
    (one view). Returns ``(mesh, info)`` with info ``exemplar`` (index), ``iou`` (per exemplar), ``scale``."""
    res = concept_mask.shape[0]
    ious, masks = [], []
    for m in exemplars:
        r = render_mesh(m, cams, res, lighting="none", backend=backend)
        mk = np.asarray(r["mask"])[0, ..., 0] > 0.5
        masks.append(mk)
        ious.append(silhouette_iou(mk, concept_mask))
    best = int(np.argmax(ious))
    bc, be = _bbox(concept_mask), _bbox(masks[best])
    sx = sy = 1.0
    if bc is not None and be is not None:
        sx = float(np.clip(bc[0] / be[0], *clip))
        sy = float(np.clip(bc[1] / be[1], *clip))
    src = exemplars[best]
    verts = src.vertices * np.asarray([sx, sy, sx], np.float32)
    mesh = normalize(dataclasses.replace(src, vertices=verts.astype(np.float32), name=f"init-from-{src.name}"))
    return mesh, {"method": "nearest_exemplar", "exemplar": best, "iou": ious, "scale": [sx, sy, sx]}


def backproject_colors(mesh: Mesh, n_views: int, resolution: int, key: jax.Array, *, backend: str = "auto"
                       ) -> tuple[np.ndarray, np.ndarray]:
    """World points ``[P,3]`` and their unlit sRGB colours ``[P,3]`` from depth renders of ``mesh``.

    Views: elevations alternating -10/30 degrees, evenly spaced azimuths (offset by a key-drawn angle),
    distance 1.6, fovy 60. A pixel at NDC (x, y) with depth d maps to camera point (x d / P00, y d / P11, -d).
    """
    off = float(jax.random.uniform(key, (), minval=0.0, maxval=360.0 / max(n_views, 1)))
    az = np.arange(n_views) * 360.0 / n_views + off
    el = np.where(np.arange(n_views) % 2 == 0, -10.0, 30.0)
    cams = make_cameras(el, az, 1.6, fovy=60.0)
    r = render_mesh(mesh, cams, resolution, lighting="none", antialias=False, backend=backend)
    col, depth, mask = (np.asarray(r[k]) for k in ("color", "depth", "mask"))
    c = (2.0 * np.arange(resolution) + 1.0) / resolution - 1.0
    x = np.broadcast_to(c[None, :], (resolution, resolution))
    y = np.broadcast_to(-c[:, None], (resolution, resolution))
    pts, cols = [], []
    proj, c2w = np.asarray(cams.proj), np.asarray(cams.c2w)
    for v in range(n_views):
        sel = (mask[v, ..., 0] > 0.99) & (depth[v, ..., 0] > 0)
        d = depth[v, ..., 0][sel]
        pc = np.stack([x[sel] * d / proj[v, 0, 0], y[sel] * d / proj[v, 1, 1], -d, np.ones_like(d)], -1)
        pts.append((pc @ c2w[v].T)[:, :3])
        cols.append(col[v][sel])
    return np.concatenate(pts).astype(np.float32), np.concatenate(cols).astype(np.float32)


def fit_dmtet_to_mesh(geo: dict, dm: DMTetConfig, mesh: Mesh, key: jax.Array, *, sdf_steps: int, n_points: int,
                      albedo_steps: int, color_views: int = 8, color_resolution: int = 96, lr: float = 1e-2,
                      backend: str = "auto") -> dict:
    """Fit the DMTet SDF and albedo fields of ``geo`` to ``mesh`` (module docstring); returns new params."""
    k_sdf, k_col, k_fit = jax.random.split(key, 3)
    target = mesh_sdf(mesh.vertices, mesh.faces, n_surface=50_000)
    surface = mesh.vertices[np.random.default_rng(0).integers(0, len(mesh.vertices), 4096)]
    geo = fit_sdf(geo, dm, target, k_sdf, steps=sdf_steps, n_points=max(n_points * 4, 8192),
                  batch=n_points, surface_points=surface, step=None)
    if albedo_steps <= 0:
        return geo
    pts, cols = backproject_colors(mesh, color_views, color_resolution, k_col, backend=backend)
    mat = {"mat_enc": geo["mat_enc"], "mat_mlp": geo["mat_mlp"]}
    opt = optax.adam(optax.cosine_decay_schedule(lr, albedo_steps, alpha=0.1))
    st = opt.init(mat)

    @jax.jit
    def step(mat, st, p, c):
        def loss(m):
            return jnp.mean(jnp.square(albedo({**geo, **m}, p, dm) - c))

        g = jax.grad(loss)(mat)
        u, st = opt.update(g, st, mat)
        return optax.apply_updates(mat, u), st

    rng = np.random.default_rng(int(jax.random.randint(k_fit, (), 0, 2 ** 31 - 1)))
    batch = min(len(pts), 4096)
    for _ in range(albedo_steps):
        i = rng.integers(0, len(pts), batch)
        mat, st = step(mat, st, jnp.asarray(pts[i]), jnp.asarray(cols[i]))
    return {**geo, **mat}
