"""Colour-space transforms, normals and compositing (all pure jnp functions, jittable).

Conventions (docs/conventions.md): shading happens in linear RGB; images written to disk / given to
image priors are sRGB. Normal maps are world-space unit normals encoded as ``0.5 * n + 0.5``.
Faces are counter-clockwise = front (normal = (v1 - v0) x (v2 - v0)).
"""
from __future__ import annotations

import jax.numpy as jnp
from jaxtyping import Array, Float, Int

__all__ = ["linear_to_srgb", "srgb_to_linear", "normals_to_rgb", "face_normals", "vertex_normals",
           "composite"]


def linear_to_srgb(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """Linear RGB -> sRGB (IEC 61966-2-1 piecewise curve); input clipped to [0, 1]."""
    x = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0)
    return jnp.where(x <= 0.0031308, 12.92 * x, 1.055 * jnp.power(jnp.maximum(x, 0.0031308), 1 / 2.4) - 0.055)


def srgb_to_linear(x: Float[Array, "..."]) -> Float[Array, "..."]:
    """sRGB -> linear RGB (inverse of :func:`linear_to_srgb`); input clipped to [0, 1]."""
    x = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0)
    return jnp.where(x <= 0.04045, x / 12.92, jnp.power((jnp.maximum(x, 0.04045) + 0.055) / 1.055, 2.4))


def normals_to_rgb(n: Float[Array, "... 3"]) -> Float[Array, "... 3"]:
    """Encode unit normals [..., 3] in [-1, 1] as colours ``0.5 * n + 0.5`` in [0, 1]."""
    return 0.5 * jnp.asarray(n, jnp.float32) + 0.5


def _safe_normalize(v, eps=1e-20):
    n2 = jnp.sum(v * v, axis=-1, keepdims=True)
    return v * jnp.where(n2 > eps, 1.0 / jnp.sqrt(jnp.maximum(n2, eps)), 0.0)


def face_normals(verts: Float[Array, "v 3"], faces: Int[Array, "f 3"], *, normalize: bool = True
                 ) -> Float[Array, "f 3"]:
    """Per-face normals [F, 3] ``(v1 - v0) x (v2 - v0)`` (unit length when ``normalize``; zero for
    degenerate faces). ``verts`` may carry leading batch dims [..., V, 3]."""
    v = jnp.asarray(verts, jnp.float32)
    f = jnp.asarray(faces, jnp.int32)
    v0, v1, v2 = (jnp.take(v, f[:, k], axis=-2) for k in range(3))
    n = jnp.cross(v1 - v0, v2 - v0)
    return _safe_normalize(n) if normalize else n


def vertex_normals(verts: Float[Array, "v 3"], faces: Int[Array, "f 3"]) -> Float[Array, "v 3"]:
    """Area-weighted per-vertex unit normals [V, 3] (zero for unreferenced vertices)."""
    v = jnp.asarray(verts, jnp.float32)
    f = jnp.asarray(faces, jnp.int32)
    fn = face_normals(v, f, normalize=False)  # length = 2 * area -> area weighting
    acc = jnp.zeros(v.shape, jnp.float32)
    for k in range(3):
        acc = acc.at[..., f[:, k], :].add(fn)
    return _safe_normalize(acc)


def composite(rgb: Float[Array, "... 3"], mask: Float[Array, "... 1"], background=(1.0, 1.0, 1.0)
              ) -> Float[Array, "... 3"]:
    """Alpha-composite ``rgb`` over a background colour (3-tuple) or image: ``rgb*m + bg*(1-m)``."""
    bg = jnp.asarray(background, jnp.float32)
    m = jnp.asarray(mask, jnp.float32)
    return jnp.asarray(rgb, jnp.float32) * m + bg * (1.0 - m)
