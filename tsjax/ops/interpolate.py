"""Attribute interpolation over rasterized triangles (nvdiffrast-like ``interpolate``)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from tsjax.ops._rows import gather_rows

__all__ = ["interpolate"]


def interpolate(attr: Float[Array, "v c"] | Float[Array, "b v c"], rast: Float[Array, "b h w 4"],
                tris: Int[Array, "f 3"], *, rast_db: Float[Array, "b h w 4"] | None = None,
                diff_attrs=None):
    """Interpolate per-vertex attributes at every covered pixel.

    Args:
      attr: [V, C] (shared by all views) or [B, V, C] per-view vertex attributes.
      rast: [B, H, W, 4] output of :func:`tsjax.ops.rasterize` (u, v, z/w, id+1).
      tris: [F, 3] int32 triangles used for ``rast``.
      rast_db: optional [B, H, W, 4] screen-space derivatives of (u, v) as (du/dX, du/dY, dv/dX,
        dv/dY) in pixels; required when ``diff_attrs`` is given.
      diff_attrs: ``"all"`` or a sequence of attribute channel indices whose screen-space
        derivatives are wanted.

    Returns:
      ``(out, out_da)``: out [B, H, W, C] = u*a0 + v*a1 + (1-u-v)*a2 (0 on empty pixels);
      out_da [B, H, W, 2*K] = (da_k/dX, da_k/dY) for the K requested channels, or None.

    Gradients flow to ``attr`` and, through (u, v) in ``rast``, to vertex positions.
    """
    attr = jnp.asarray(attr)
    if attr.ndim not in (2, 3):
        raise ValueError(f"interpolate: attr must be [V,C] or [B,V,C], got shape {tuple(attr.shape)}")
    if rast.ndim != 4 or rast.shape[-1] != 4:
        raise ValueError(f"interpolate: rast must be [B,H,W,4], got shape {tuple(rast.shape)}")
    b, h, w = rast.shape[:3]
    if attr.ndim == 2:
        attr = attr[None]  # shared by all views (its gradient is summed over views)
    elif attr.shape[0] != b:
        raise ValueError(f"interpolate: attr batch {attr.shape[0]} != rast batch {b}")
    tri_ids = jax.lax.stop_gradient(rast[..., 3]).astype(jnp.int32)
    covered = tri_ids > 0
    fid = jnp.where(covered, tri_ids - 1, 0).reshape(b, h * w)
    vidx = gather_rows(jnp.asarray(tris, jnp.int32)[None], fid)  # [B, H*W, 3]
    a = gather_rows(attr, vidx.reshape(b, h * w * 3)).reshape(b, h, w, 3, attr.shape[-1])
    u, v = rast[..., 0:1], rast[..., 1:2]
    out = u * a[..., 0, :] + v * a[..., 1, :] + (1.0 - u - v) * a[..., 2, :]
    out = jnp.where(covered[..., None], out, 0.0)
    if diff_attrs is None:
        return out, None
    if rast_db is None:
        raise ValueError("interpolate: diff_attrs needs rast_db (screen-space derivatives of u, v)")
    chans = list(range(attr.shape[-1])) if diff_attrs == "all" else list(diff_attrs)
    da_du = (a[..., 0, :] - a[..., 2, :])[..., chans]
    da_dv = (a[..., 1, :] - a[..., 2, :])[..., chans]
    dx = da_du * rast_db[..., 0:1] + da_dv * rast_db[..., 2:3]
    dy = da_du * rast_db[..., 1:2] + da_dv * rast_db[..., 3:4]
    out_da = jnp.stack([dx, dy], axis=-1).reshape(dx.shape[:-1] + (2 * len(chans),))
    return out, jnp.where(covered[..., None], out_da, 0.0)
