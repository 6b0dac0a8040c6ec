"""GroupNorm (+ optional SiLU) that runs tsjax's native kernels on the CPU.

XLA:CPU computes the UNets' and VAE's GroupNorm as separate reduction passes plus a normalisation
fusion, 3-10x over the memory-bandwidth bound and 1.5-4x slower than PyTorch's fused CPU kernel
(bench/README.md, "Native CPU GroupNorm"). :func:`group_norm` is ``torch.nn.GroupNorm`` on channels-last
data (the semantics of ``flax.linen.GroupNorm(use_fast_variance=False)``: float32 two-pass statistics,
``y = (x - mean) * (rsqrt(var + eps) * scale) + bias``), optionally followed by SiLU in float32 before the
result is cast to ``x.dtype``. On the CPU forward and backward are XLA FFI calls into
``csrc/kernels/group_norm_cpu*.cc`` (AVX-512F or AVX2+FMA; float32 or bfloat16 data; results do not
depend on the thread count); elsewhere, and for channel counts the kernels do not take, the same
computation in ``jax.numpy`` (``lax.platform_dependent``). ``TSJAX_NATIVE_GROUP_NORM=0`` (read when a
function is traced) turns the native path off.
"""
from __future__ import annotations

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["group_norm", "native_eligible"]


def native_eligible(x_shape, dtype, groups: int) -> bool:
    """Whether :func:`group_norm` takes the native path: float32 or bfloat16 data whose channel count is a
    multiple of ``groups`` and of the kernels' vector width (16 with AVX-512F, 8 with AVX2)."""
    if os.environ.get("TSJAX_NATIVE_GROUP_NORM", "1") == "0" or len(x_shape) < 2:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False
    from tsjax.ops import _ffi

    width, c = _ffi.cpu_vector_width(), x_shape[-1]
    return width > 0 and c % groups == 0 and c % width == 0


def _reference(x, scale, bias, groups, eps, silu):
    """``[B, N, C]`` -> ``[B, N, C]``: flax's GroupNorm (two-pass float32 statistics), then SiLU."""
    b, n, c = x.shape
    xf = x.astype(jnp.float32).reshape(b, n, groups, c // groups)
    mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
    mul = jax.lax.rsqrt(var + eps) * scale.reshape(groups, c // groups)
    y = ((xf - mean) * mul).reshape(b, n, c) + bias
    if silu:
        y = jax.nn.silu(y)
    return y.astype(x.dtype)


def _attrs(groups, eps, silu):
    return dict(groups=np.int64(groups), eps=np.float32(eps), silu=bool(silu))


def _native_forward(x, scale, bias, groups, eps, silu):
    b, _, c = x.shape
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct((b, groups), jnp.float32),
           jax.ShapeDtypeStruct((b, groups), jnp.float32))
    return jax.ffi.ffi_call("tsjax_group_norm_forward", out, vmap_method="sequential")(
        x, scale, bias, **_attrs(groups, eps, silu))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _native(x, scale, bias, groups, eps, silu):
    return _native_forward(x, scale, bias, groups, eps, silu)[0]


def _native_fwd(x, scale, bias, groups, eps, silu):
    y, mean, rstd = _native_forward(x, scale, bias, groups, eps, silu)
    return y, (x, scale, bias, mean, rstd)


def _native_bwd(groups, eps, silu, res, dy):
    x, scale, bias, mean, rstd = res
    out = (jax.ShapeDtypeStruct(x.shape, x.dtype), jax.ShapeDtypeStruct(scale.shape, jnp.float32),
           jax.ShapeDtypeStruct(bias.shape, jnp.float32))
    return jax.ffi.ffi_call("tsjax_group_norm_backward", out, vmap_method="sequential")(
        x, dy.astype(x.dtype), scale, bias, mean, rstd, **_attrs(groups, eps, silu))


_native.defvjp(_native_fwd, _native_bwd)


def group_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, *, groups: int, eps: float,
               silu: bool = False) -> jax.Array:
    """GroupNorm over the last (channel) axis, per batch element, then SiLU if ``silu``.

    Args:
      x: ``[B, ..., C]`` (channels last: NHWC maps or ``[B, N, C]`` tokens), float32 or bfloat16.
      scale, bias: ``[C]`` (float32; cast to float32).
      groups: channel groups (``C % groups == 0``); eps: added to the variance.
    Returns ``x.dtype``, shape of ``x``. Differentiable in ``x``, ``scale`` and ``bias``.
    """
    shape = x.shape
    x3 = x.reshape(shape[0], -1, shape[-1])
    scale, bias = scale.astype(jnp.float32), bias.astype(jnp.float32)
    ref = functools.partial(_reference, groups=groups, eps=eps, silu=silu)
    if not native_eligible(shape, x.dtype, groups):
        return ref(x3, scale, bias).reshape(shape)
    y = jax.lax.platform_dependent(x3, scale, bias, cpu=lambda a, s, b: _native(a, s, b, groups, eps, silu),
                                   default=ref)
    return y.reshape(shape)
