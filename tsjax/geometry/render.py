"""Differentiable rendering of the DMTet surface (re-extracted at every call) with ``tsjax.ops``.

Outputs (docs/conventions.md), all [B, H, W, C] float32:
  * ``albedo``: the material field (sRGB) queried at the rasterized world position of every pixel,
    composited over ``background`` (sRGB).
  * ``color``: ``shading="unlit"`` (default, as in the stage-2 objective: the albedo itself) or
    ``"lambert"``: the head-light model of :func:`tsjax.render.mesh_render.render_mesh` applied in linear
    RGB (``albedo_lin * (0.45 + 0.55 max(0, n.l))``) and converted back to sRGB. Composited over
    ``background`` (sRGB).
  * ``normal``: interpolated area-weighted vertex normals (world space, unit, +Y up) encoded
    ``0.5 n + 0.5`` over the same background.
  * ``mask`` [.., 1]: coverage in [0, 1] (antialiased at silhouettes, so it has gradients w.r.t. the
    vertex positions and, through marching tets, the SDF).
  * ``depth`` [.., 1]: camera-space distance along -Z, 0 on background (not antialiased).
Gradients reach the SDF/deformation through the extracted vertex positions (interpolation inside
triangles, antialiasing at silhouettes) and the material field through the albedo. ``background`` may be
a 3-tuple or an image [B, H, W, 3] (e.g. a neural environment colour).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.geometry.dmtet import DMTetConfig, albedo, extract
from tsjax.geometry.marching import TriMesh
from tsjax.geometry.tets import TetGrid
from tsjax.render.camera import Cameras
from tsjax.render.mesh_render import AMBIENT, LIGHT_DIR_CAMERA
from tsjax.render.shading import linear_to_srgb, srgb_to_linear, vertex_normals

__all__ = ["render", "render_trimesh"]


def render_trimesh(mesh: TriMesh, albedo_fn, cams: Cameras, resolution, *, background=(1.0, 1.0, 1.0),
                   shading: str = "unlit", antialias: bool = True, backend: str = "auto") -> dict:
    """Render a fixed-capacity :class:`TriMesh`; ``albedo_fn(points [..., 3]) -> sRGB [..., 3]``.

    See the module docstring for the outputs. Jittable (``resolution``/``shading``/``backend`` static).
    """
    from tsjax.ops import antialias as aa_op
    from tsjax.ops import interpolate, rasterize

    if shading not in ("unlit", "lambert"):
        raise ValueError(f"render: shading must be 'unlit' or 'lambert', got {shading!r}")
    h, w = (int(resolution), int(resolution)) if np.ndim(resolution) == 0 else tuple(int(r) for r in resolution)
    c2w = jnp.asarray(cams.c2w, jnp.float32)
    proj = jnp.asarray(cams.proj, jnp.float32)
    if c2w.ndim == 2:
        c2w, proj = c2w[None], proj[None]
    b = c2w.shape[0]
    verts, faces = mesh.verts, mesh.faces
    hom = jnp.concatenate([verts, jnp.ones_like(verts[:, :1])], -1)
    pos_cam = jnp.einsum("bij,vj->bvi", jnp.linalg.inv(c2w), hom)
    pos_clip = jnp.einsum("bij,bvj->bvi", proj, pos_cam)
    rast = rasterize(pos_clip, faces, (h, w), backend=backend)
    cov = (jax.lax.stop_gradient(rast[..., 3:4]) > 0).astype(jnp.float32)

    vn = vertex_normals(verts, faces)  # invalid faces are degenerate -> contribute nothing
    attrs = jnp.concatenate([verts, vn], -1)
    interp, _ = interpolate(attrs, rast, faces)
    world_p, n = interp[..., :3], interp[..., 3:6]
    n = n * jax.lax.rsqrt(jnp.maximum(jnp.sum(n * n, -1, keepdims=True), 1e-12))
    depth, _ = interpolate(-pos_cam[..., 2:3], rast, faces)

    alb = albedo_fn(world_p)  # sRGB [B,H,W,3]
    if shading == "lambert":
        l_cam = jnp.asarray(LIGHT_DIR_CAMERA, jnp.float32)
        l_world = jnp.einsum("bij,j->bi", c2w[:, :3, :3], l_cam / jnp.linalg.norm(l_cam))[:, None, None, :]
        shade = AMBIENT + (1.0 - AMBIENT) * jnp.maximum(jnp.sum(n * l_world, -1, keepdims=True), 0.0)
        col = linear_to_srgb(srgb_to_linear(alb) * shade)
    else:
        col = alb
    bg = jnp.asarray(background, jnp.float32)
    bg = jnp.broadcast_to(bg, (b, h, w, 3))
    stack = jnp.concatenate([col * cov + bg * (1 - cov), alb * cov + bg * (1 - cov),
                             (0.5 * n + 0.5) * cov + bg * (1 - cov), cov], -1)
    if antialias:
        stack = aa_op(stack, rast, pos_clip, faces)
    return dict(color=stack[..., 0:3], albedo=stack[..., 3:6], normal=jnp.clip(stack[..., 6:9], 0.0, 1.0),
                mask=jnp.clip(stack[..., 9:10], 0.0, 1.0), depth=depth * cov)


def render(params: dict, grid: TetGrid, cams: Cameras, resolution, cfg: DMTetConfig, *, step=None,
           background=(1.0, 1.0, 1.0), shading: str = "unlit", antialias: bool = True, backend: str = "auto",
           return_mesh: bool = False) -> dict:
    """Extract the DMTet surface and render it from ``cams`` (see the module docstring).

    Args:
      params: :func:`tsjax.geometry.dmtet.init` parameters.
      grid: the tet grid (a pytree: pass it as a jit argument, not a closure, at large resolutions).
      cams: :class:`tsjax.render.camera.Cameras` [B].
      resolution: int or (H, W), static.
      cfg: the :class:`DMTetConfig` (static).
      step: optional int for the progressive hash-grid band.
      return_mesh: also return the extracted mesh under ``"mesh"`` (metrics ``num_faces``, ``overflow``).

    Returns:
      dict(color, albedo, normal [B,H,W,3], mask, depth [B,H,W,1]) (+ ``mesh``).
    """
    mesh = extract(params, grid, cfg, step)
    out = render_trimesh(mesh, lambda p: albedo(params, p, cfg), cams, resolution, background=background,
                         shading=shading, antialias=antialias, backend=backend)
    if return_mesh:
        out["mesh"] = mesh
    return out
