"""Bilinear texture lookup, differentiable w.r.t. the texture and the texture coordinates."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

__all__ = ["texture"]


def texture(tex: Float[Array, "ht wt c"] | Float[Array, "b ht wt c"], uv: Float[Array, "b h w 2"], *,
            filter_mode: str = "linear", boundary_mode: str = "wrap") -> Float[Array, "b h w c"]:
    """Sample ``tex`` at ``uv``.

    Conventions: uv (0, 0) is the corner of the first texel (row 0, column 0) of the array; u runs
    along the width, v along the height (glTF); texel centres sit at ((j + 0.5)/Wt, (i + 0.5)/Ht).

    Args:
      tex: [Ht, Wt, C] shared texture or [B, Ht, Wt, C] per-view textures.
      uv: [B, H, W, 2] texture coordinates (any leading shape [B, ...] works).
      filter_mode: "linear" (bilinear) or "nearest".
      boundary_mode: "wrap" (repeat, glTF default) or "clamp" (clamp to edge).

    Returns:
      [B, H, W, C] samples. Gradients reach ``tex`` (bilinear weights) and ``uv`` (through the
      weights; piecewise linear, so zero for "nearest").
    """
    if filter_mode not in ("linear", "nearest"):
        raise ValueError(f"texture: filter_mode must be 'linear' or 'nearest', got {filter_mode!r}")
    if boundary_mode not in ("wrap", "clamp"):
        raise ValueError(f"texture: boundary_mode must be 'wrap' or 'clamp', got {boundary_mode!r}")
    tex = jnp.asarray(tex)
    if tex.ndim not in (3, 4):
        raise ValueError(f"texture: tex must be [Ht,Wt,C] or [B,Ht,Wt,C], got shape {tuple(tex.shape)}")
    if uv.shape[-1] != 2:
        raise ValueError(f"texture: uv must end in 2 channels, got shape {tuple(uv.shape)}")
    b = uv.shape[0]
    if tex.ndim == 3:
        tex = jnp.broadcast_to(tex[None], (b,) + tex.shape)
    ht, wt = tex.shape[1], tex.shape[2]

    def fix(i, n):
        return jnp.mod(i, n) if boundary_mode == "wrap" else jnp.clip(i, 0, n - 1)

    x = uv[..., 0] * wt - 0.5
    y = uv[..., 1] * ht - 0.5

    def gather(t, yi, xi):
        return t[yi, xi]

    if filter_mode == "nearest":
        xi = fix(jnp.floor(x + 0.5).astype(jnp.int32), wt)
        yi = fix(jnp.floor(y + 0.5).astype(jnp.int32), ht)
        return jax.vmap(gather)(tex, yi, xi)
    x0 = jnp.floor(x)
    y0 = jnp.floor(y)
    fx = (x - x0)[..., None]
    fy = (y - y0)[..., None]
    x0i, y0i = x0.astype(jnp.int32), y0.astype(jnp.int32)
    xa, xb = fix(x0i, wt), fix(x0i + 1, wt)
    ya, yb = fix(y0i, ht), fix(y0i + 1, ht)
    g = jax.vmap(gather)
    top = g(tex, ya, xa) * (1.0 - fx) + g(tex, ya, xb) * fx
    bot = g(tex, yb, xa) * (1.0 - fx) + g(tex, yb, xb) * fx
    return top * (1.0 - fy) + bot * fy
