"""LayerNorm that runs tsjax's native kernels on the CPU.

XLA:CPU computes the transformer blocks' LayerNorms as separate reduction passes for the mean and the
variance plus a normalisation fusion (and its gradient as several more): ~55 ms of a UNet training step
against ~15 ms for PyTorch's fused CPU kernel. :func:`layer_norm` is ``torch.nn.LayerNorm`` over the last
axis, with the semantics of ``flax.linen.LayerNorm(use_fast_variance=False)``: float32 two-pass statistics
per row, ``y = (x - mean) * (rsqrt(var + eps) * scale) + bias``, cast to ``x.dtype``. On the CPU forward
and backward are XLA FFI calls into ``csrc/kernels/layer_norm_cpu*.cc`` (AVX-512F or AVX2+FMA; float32 or
bfloat16 data; each row read once per pass group; results do not depend on the thread count); elsewhere,
and for channel counts the kernels do not take (not a multiple of the vector width: 16 floats with
AVX-512F, 8 with AVX2), the same computation in ``jax.numpy`` (``lax.platform_dependent``). Under
``vmap`` the native calls take the mapped axes as more rows (``vmap_method="broadcast_all"``).

``TSJAX_NATIVE_LAYER_NORM=0`` (read when a function is traced) turns the native path off;
``TSJAX_CPU_THREADS`` / ``TSJAX_CPU_ISA`` are read by the kernels.
"""
from __future__ import annotations

import functools
import math
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["layer_norm", "native_eligible"]

_TARGETS = ("tsjax_layer_norm_forward", "tsjax_layer_norm_backward")


def native_eligible(x_shape, dtype) -> bool:
    """Whether :func:`layer_norm` takes the native path on the CPU: non-empty float32 or bfloat16 data whose
    channel (last) count is a multiple of the kernels' vector width (16 with AVX-512F, 8 with AVX2), the
    kernels built and registered, and ``TSJAX_NATIVE_LAYER_NORM`` not ``0``."""
    if os.environ.get("TSJAX_NATIVE_LAYER_NORM", "1") == "0" or len(x_shape) < 1 or math.prod(x_shape) == 0:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False
    from tsjax.ops import _ffi

    if not _ffi.targets_registered(*_TARGETS):
        return False
    width = _ffi.cpu_vector_width()
    return width > 0 and x_shape[-1] % width == 0


def _reference(x, scale, bias, eps):
    """flax's LayerNorm over the last axis (two-pass statistics in float32, or wider for wider ``x``),
    cast to ``x.dtype``."""
    xf = x.astype(jnp.promote_types(jnp.float32, x.dtype))
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    mul = jax.lax.rsqrt(var + eps) * scale
    return ((xf - mean) * mul + bias).astype(x.dtype)


def _forward(x, scale, bias, eps):
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32),
           jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32))
    return jax.ffi.ffi_call("tsjax_layer_norm_forward", out, vmap_method="broadcast_all")(
        x, scale, bias, eps=np.float32(eps))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _native(x, scale, bias, eps):
    return _forward(x, scale, bias, eps)[0]


def _native_fwd(x, scale, bias, eps):
    y, mean, rstd = _forward(x, scale, bias, eps)
    return y, (x, scale, mean, rstd)


def _native_bwd(eps, res, dy):
    x, scale, mean, rstd = res
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(scale.shape, jnp.float32),
           jax.ShapeDtypeStruct(scale.shape, jnp.float32))
    return jax.ffi.ffi_call("tsjax_layer_norm_backward", out, vmap_method="broadcast_all")(
        x, dy.astype(x.dtype), scale, mean, rstd, eps=np.float32(eps))


_native.defvjp(_native_fwd, _native_bwd)


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, eps: float) -> jax.Array:
    """LayerNorm over the last axis of ``x``.

    Args:
      x: ``[..., C]``, float32 or bfloat16 (other dtypes: the ``jax.numpy`` path).
      scale, bias: ``[C]`` (cast to float32).
      eps: added to the variance.
    Returns ``x.dtype``, shape of ``x``. Differentiable in ``x``, ``scale`` and ``bias``.
    """
    shape = x.shape
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    ref = functools.partial(_reference, eps=eps)
    if not native_eligible(shape, x.dtype):
        return ref(x, scale, bias)
    x2 = x.reshape(-1, shape[-1])
    y = jax.lax.platform_dependent(x2, scale, bias, cpu=lambda a, s, b: _native(a, s, b, eps), default=ref)
    return y.reshape(shape)
