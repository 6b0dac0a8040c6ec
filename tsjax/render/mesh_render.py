"""Render a (textured, vertex-coloured) triangle mesh from a batch of cameras with ``tsjax.ops``.

Shading model (linear RGB, documented default ``lighting="lambert"``):
  ``albedo = texture(uv) * vertex_colour`` (both linear; texture = 1 when the mesh has none),
  ``colour = albedo * (ambient + (1 - ambient) * max(0, n . l))`` with ``ambient = 0.45`` and a
  head-light ``l`` fixed in the camera frame (from the upper left of the viewer,
  camera-space direction ``(-0.35, 0.5, 1)`` normalised), so every view reads as lit from the front.
  ``lighting="none"`` returns the unlit albedo. The colour is composited over ``background`` (given in
  sRGB, converted to linear), antialiased at silhouettes, and converted to sRGB.
Normals: flat per-face world-space normals (``(v1 - v0) x (v2 - v0)``), flipped to face the camera
  (two-sided: open or inconsistently wound exemplar meshes still encode the visible side), encoded
  ``0.5 n + 0.5`` and composited over the same background as the colour.
Depth: camera-space distance along -Z (0 on background). Mask: coverage in [0, 1] (antialiased).

Performance: the whole batched render is one ``jax.jit`` (static resolution/backend/lighting); mesh
arrays are padded to bucketed sizes (:func:`_bucket`) so meshes of similar size reuse a compilation.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from tsjax.render.camera import Cameras
from tsjax.render.shading import face_normals, linear_to_srgb, normals_to_rgb, srgb_to_linear

__all__ = ["render_mesh", "mesh_arrays"]

AMBIENT = 0.45
LIGHT_DIR_CAMERA = (-0.35, 0.5, 1.0)


def _bucket(n: int) -> int:
    """Padded size: next power of two (>= 64) below 4096, then the next multiple of 4096."""
    if n <= 4096:
        return max(64, 1 << (int(n) - 1).bit_length())
    return -(-int(n) // 4096) * 4096


def mesh_arrays(mesh):
    """(verts [V,3], faces [F,3] int32, colors [V,3], uv [V,2] | None, texture [Ht,Wt,3] | None) from a
    ``tsjax.data.mesh.Mesh`` or a tuple ``(verts, faces[, colors[, uv, texture]])``."""
    if hasattr(mesh, "vertices"):
        return mesh.vertices, mesh.faces, mesh.colors, mesh.uv, mesh.texture
    mesh = tuple(mesh)
    if len(mesh) < 2:
        raise ValueError("render_mesh: mesh must be a Mesh or a tuple (verts, faces[, colors[, uv, texture]])")
    v, f = mesh[0], mesh[1]
    c = mesh[2] if len(mesh) > 2 and mesh[2] is not None else np.ones(np.shape(v), np.float32)
    uv = mesh[3] if len(mesh) > 3 else None
    tex = mesh[4] if len(mesh) > 4 else None
    return v, f, c, uv, tex


@functools.partial(jax.jit, static_argnames=("resolution", "aa", "lighting", "backend"))
def _render(verts, faces, colors, uv, tex, c2w, proj, bg, *, resolution, aa, lighting, backend):
    from tsjax.ops import interpolate, rasterize, texture
    from tsjax.ops.antialias import antialias

    cams = Cameras(c2w, proj)
    hom = jnp.concatenate([verts, jnp.ones_like(verts[:, :1])], -1)
    w2c = jnp.linalg.inv(c2w)
    pos_cam = jnp.einsum("bij,vj->bvi", w2c, hom)  # [B,V,4]
    pos_clip = jnp.einsum("bij,bvj->bvi", proj, pos_cam)
    rast = rasterize(pos_clip, faces, resolution, backend=backend)
    tri = rast[..., 3].astype(jnp.int32)
    cov = (tri > 0)[..., None].astype(jnp.float32)

    albedo, _ = interpolate(colors, rast, faces)
    if tex is not None:
        uvs, _ = interpolate(uv, rast, faces)
        albedo = albedo * texture(tex, uvs, filter_mode="linear", boundary_mode="clamp")

    fn = face_normals(verts, faces)  # [F,3] world
    n = jnp.take(fn, jnp.maximum(tri - 1, 0), axis=0)  # [B,H,W,3]
    # flip to face the camera: view vector from the surface point to the camera
    depth, _ = interpolate(-pos_cam[..., 2:3], rast, faces)
    world_p, _ = interpolate(jnp.broadcast_to(verts, pos_cam.shape[:2] + (3,)), rast, faces)
    to_cam = c2w[:, None, None, :3, 3] - world_p
    if_back = jnp.sum(n * to_cam, -1, keepdims=True) < 0
    n = jnp.where(if_back, -n, n) * cov

    if lighting == "lambert":
        l_cam = jnp.asarray(LIGHT_DIR_CAMERA, jnp.float32)
        l_cam = l_cam / jnp.linalg.norm(l_cam)
        l_world = jnp.einsum("bij,j->bi", c2w[:, :3, :3], l_cam)[:, None, None, :]
        shade = AMBIENT + (1.0 - AMBIENT) * jnp.maximum(jnp.sum(n * l_world, -1, keepdims=True), 0.0)
        rgb = albedo * shade
    else:
        rgb = albedo
    bg_lin = srgb_to_linear(bg)
    color = rgb * cov + bg_lin * (1.0 - cov)
    normal = normals_to_rgb(n) * cov + bg * (1.0 - cov)
    mask = cov
    if aa:
        color = antialias(color, rast, pos_clip, faces)
        normal = antialias(normal, rast, pos_clip, faces)
        mask = antialias(mask, rast, pos_clip, faces)
    return dict(color=linear_to_srgb(color), normal=jnp.clip(normal, 0.0, 1.0), mask=jnp.clip(mask, 0.0, 1.0),
                depth=depth * cov)


def render_mesh(mesh_arrays_or_mesh, cams: Cameras, resolution, *, background=(1.0, 1.0, 1.0),
                antialias: bool = True, backend: str = "auto", lighting: str = "lambert"
                ) -> dict[str, Float[Array, "b h w c"]]:
    """Render a mesh from B cameras.

    Args:
      mesh_arrays_or_mesh: ``tsjax.data.mesh.Mesh`` (textures supported) or ``(verts [V,3], faces [F,3]
        int32, vertex colours [V,3] linear)`` (optionally ``+ (uv [V,2], texture [Ht,Wt,3] linear)``).
      cams: :class:`tsjax.render.camera.Cameras` with [B, 4, 4] matrices.
      resolution: int or (H, W).
      background: sRGB background colour (3-tuple), used for colour and normal images.
      antialias: blend silhouettes with ``tsjax.ops.antialias``.
      backend: rasterizer backend ("auto" | "ref" | "ffi" | "nvdiffrast").
      lighting: "lambert" (default, see module docstring) or "none" (unlit albedo).

    Returns:
      dict with ``color [B,H,W,3]`` sRGB, ``normal [B,H,W,3]`` encoded world normals,
      ``mask [B,H,W,1]`` and ``depth [B,H,W,1]`` (camera-space distance along -Z, 0 = background).
    """
    if lighting not in ("lambert", "none"):
        raise ValueError(f"render_mesh: lighting must be 'lambert' or 'none', got {lighting!r}")
    res = (int(resolution), int(resolution)) if np.ndim(resolution) == 0 else tuple(int(r) for r in resolution)
    v, f, c, uv, tex = mesh_arrays(mesh_arrays_or_mesh)
    v = jnp.asarray(v, jnp.float32)
    f = jnp.asarray(f, jnp.int32)
    c = jnp.asarray(c, jnp.float32)
    if (uv is None) != (tex is None):
        raise ValueError("render_mesh: uv and texture must be given together")
    uv = None if uv is None else jnp.asarray(uv, jnp.float32)
    tex = None if tex is None else jnp.asarray(tex, jnp.float32)
    # pad to bucketed sizes so meshes of similar size share one compilation: extra vertices sit at the
    # origin, extra faces are (0, 0, 0) (zero area, never rasterized)
    nv, nf = _bucket(v.shape[0]), _bucket(f.shape[0])
    pad_v = nv - v.shape[0]
    v = jnp.pad(v, ((0, pad_v), (0, 0)))
    c = jnp.pad(c, ((0, pad_v), (0, 0)), constant_values=1.0)
    uv = None if uv is None else jnp.pad(uv, ((0, pad_v), (0, 0)))
    f = jnp.pad(f, ((0, nf - f.shape[0]), (0, 0)))
    c2w = jnp.asarray(cams.c2w, jnp.float32)
    proj = jnp.asarray(cams.proj, jnp.float32)
    if c2w.ndim == 2:
        c2w, proj = c2w[None], proj[None]
    bg = jnp.asarray(background, jnp.float32)
    return _render(v, f, c, uv, tex, c2w, proj, bg, resolution=res, aa=bool(antialias),
                   lighting=lighting, backend=backend)
