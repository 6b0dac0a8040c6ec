"""Optional nvdiffrast backend for triangle ids (never imported by default).

Only usable where ``nvdiffrast.torch`` and a CUDA torch are importable; data go through DLPack.
Not testable on CPU-only hosts: the import/CUDA checks raise a clear error there.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def rasterize_ids(pos_clip, tris, h: int, w: int):
    """Triangle id + 1 [B, H, W] int32 from nvdiffrast (row 0 = top, flipped from nvdiffrast's
    bottom-up rows). Must be called outside jit (concrete arrays)."""
    try:
        import nvdiffrast.torch as dr
        import torch
    except ImportError as e:
        raise RuntimeError(f"rasterize: backend='nvdiffrast' needs nvdiffrast and torch ({e}); use 'ffi' or 'ref'")
    if not torch.cuda.is_available():
        raise RuntimeError("rasterize: backend='nvdiffrast' needs a CUDA device; use 'ffi' or 'ref'")
    if isinstance(pos_clip, jax.core.Tracer):
        raise RuntimeError("rasterize: backend='nvdiffrast' cannot be used inside jit")
    pos_t = torch.from_dlpack(jnp.asarray(pos_clip, jnp.float32)).cuda().contiguous()
    tri_t = torch.from_dlpack(jnp.asarray(tris, jnp.int32)).cuda().contiguous()
    ctx = dr.RasterizeCudaContext()
    rast, _ = dr.rasterize(ctx, pos_t, tri_t, (h, w))
    ids = rast[..., 3].flip(1).to(torch.int32).contiguous().cpu()
    return jnp.asarray(jax.dlpack.from_dlpack(ids))
