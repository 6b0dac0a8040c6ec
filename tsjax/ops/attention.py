"""Scaled dot-product attention that runs tsjax's native flash-attention kernels on the CPU.

XLA:CPU runs the UNets' self-attention over 1024-4096 tokens 1.7-2.5x slower than PyTorch's CPU flash
attention, forward and backward (bench/README.md, "Native CPU attention"). :func:`flash_attention`
computes ``softmax(q k^T / sqrt(D)) v`` (no mask) and on the CPU runs forward and backward as XLA FFI
calls into ``csrc/kernels/attention_cpu*.cc`` (AVX-512F or AVX2+FMA): blocks of 64 queries x 64 keys,
online softmax, the per-row log-sum-exp kept for the backward, which recomputes the weights blockwise
(flash-attention style), so no ``[N, M]`` matrix is ever stored. float32, float32 accumulation;
results do not depend on the thread count. On other platforms ``lax.platform_dependent`` selects
``jax.nn.dot_product_attention`` (XLA). Under ``vmap`` the native calls run once per mapped element.

``TSJAX_NATIVE_ATTENTION=0`` (read when a function is traced) turns the native path off;
``TSJAX_CPU_THREADS`` / ``TSJAX_CPU_ISA`` are read by the kernels.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["flash_attention", "native_available", "native_eligible"]


def native_available() -> bool:
    """True when the native CPU kernels are built and usable on this CPU and not turned off
    (``TSJAX_NATIVE_ATTENTION=0``)."""
    if os.environ.get("TSJAX_NATIVE_ATTENTION", "1") == "0":
        return False
    from tsjax.ops import _ffi

    return _ffi.cpu_isa() > 0


def native_eligible(q_shape, k_shape) -> bool:
    """Whether :func:`flash_attention` takes the native path: rank-4 ``[B, N, H, D]`` operands with ``D``
    a multiple of the kernels' vector width (16 floats with AVX-512F, 8 with AVX2) and the kernels
    available."""
    if len(q_shape) != 4 or len(k_shape) != 4 or not native_available():
        return False
    from tsjax.ops import _ffi

    return q_shape[-1] % _ffi.cpu_vector_width() == 0


def _xla_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, scale=1.0 / math.sqrt(q.shape[-1]), implementation="xla")


def _forward(q, k, v):
    b, n, h, d = q.shape
    out = (jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, h, n), jnp.float32))
    return jax.ffi.ffi_call("tsjax_attention_forward", out, vmap_method="sequential")(
        q, k, v, scale=np.float32(1.0 / math.sqrt(d)))


@jax.custom_vjp
def _native(q, k, v):
    return _forward(q, k, v)[0]


def _native_fwd(q, k, v):
    o, lse = _forward(q, k, v)
    return o, (q, k, v, o, lse)


def _native_bwd(res, do):
    q, k, v, o, lse = res
    out = tuple(jax.ShapeDtypeStruct(a.shape, jnp.float32) for a in (q, k, v))
    return jax.ffi.ffi_call("tsjax_attention_backward", out, vmap_method="sequential")(
        q, k, v, o, lse, do.astype(jnp.float32), scale=np.float32(1.0 / math.sqrt(q.shape[-1])))


_native.defvjp(_native_fwd, _native_bwd)


def flash_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    """``softmax(q k^T / sqrt(D)) v`` per batch and head, without a mask.

    Args:
      q: ``[B, N, H, D]``; k, v: ``[B, M, H, D]``. Computed in float32 (other dtypes are cast).
    Returns ``[B, N, H, D]`` in ``q.dtype``. Differentiable in ``q``, ``k`` and ``v``. Operands the native
    kernels do not take (:func:`native_eligible`) go to ``jax.nn.dot_product_attention``.
    """
    dtype = q.dtype
    q, k, v = (a.astype(jnp.float32) for a in (q, k, v))
    if not native_eligible(q.shape, k.shape):
        return _xla_attention(q, k, v).astype(dtype)
    return jax.lax.platform_dependent(q, k, v, cpu=_native, default=_xla_attention).astype(dtype)
