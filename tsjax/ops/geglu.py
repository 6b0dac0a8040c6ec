"""GEGLU (``h * gelu(gate)``, exact GELU) that runs tsjax's native kernels on the CPU.

The transformer blocks' feed-forward (diffusers ``GEGLU``) splits its projection ``x [..., 2F]`` (plus its
bias) into ``h, gate = x[..., :F], x[..., F:]`` and returns ``h * gelu(gate)`` with the exact (erf) GELU.
XLA:CPU evaluates that GELU through ``erfc``, recomputes the forward inside the backward and concatenates
the two input-gradient halves: ~85 ms of the mid UNet's forward+backward on one core against ~40 ms for
PyTorch (bench/README.md). :func:`geglu` adds the bias and does the forward in one pass
(``csrc/kernels/geglu_cpu*.cc``, AVX-512F or AVX2+FMA, float32 or bfloat16 data computed in float32) and
the backward in another that writes both gradient halves and the bias gradient; the residual is ``x``. Elsewhere (other platforms, ``F`` not a multiple of the
kernels' vector width, other dtypes) the same function in ``jax.numpy`` (``lax.platform_dependent``).
Under ``vmap`` the native calls run once per mapped element. ``TSJAX_NATIVE_GEGLU=0`` (read when a function
is traced) turns the native path off.

Numerics: ``gelu(g) = g * (1 + erf(g / sqrt(2))) / 2`` (PyTorch's formula) with XLA's float32 rational erf
(|error| < 4e-7); ``jax.nn.gelu(approximate=False)`` computes ``g * erfc(-g / sqrt(2)) / 2``: the two agree
to ~1 ulp of the result's scale.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp

__all__ = ["geglu", "native_eligible"]

_TARGETS = ("tsjax_geglu_forward", "tsjax_geglu_backward")


def native_eligible(x_shape, dtype) -> bool:
    """Whether :func:`geglu` takes the native path for ``x`` of this shape and dtype: float32 or bfloat16,
    ``F = x_shape[-1] // 2`` a multiple of the kernels' vector width (16 with AVX-512F, 8 with AVX2), the
    kernels built, ``TSJAX_NATIVE_GEGLU`` not ``0``."""
    if os.environ.get("TSJAX_NATIVE_GEGLU", "1") == "0" or len(x_shape) < 1 or x_shape[-1] % 2:
        return False
    if jnp.dtype(dtype) not in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16)):
        return False
    from tsjax.ops import _ffi

    width = _ffi.cpu_vector_width()
    return width > 0 and _ffi.targets_registered(*_TARGETS) and (x_shape[-1] // 2) % width == 0


def _reference(x, bias):
    """The jax.numpy GEGLU (what ``nn.Dense`` + split + ``jax.nn.gelu`` computed: bias added in x's dtype)."""
    h, gate = jnp.split(x + bias.astype(x.dtype), 2, axis=-1)
    return h * jax.nn.gelu(gate, approximate=False)


def _forward_call(x2, bias):
    r, f2 = x2.shape
    return jax.ffi.ffi_call(_TARGETS[0], jax.ShapeDtypeStruct((r, f2 // 2), x2.dtype),
                            vmap_method="sequential")(x2, bias)


@jax.custom_vjp
def _native(x2, bias):
    return _forward_call(x2, bias)


def _native_fwd(x2, bias):
    return _forward_call(x2, bias), (x2, bias)


def _native_bwd(res, dy):
    x2, bias = res
    out = (jax.ShapeDtypeStruct(x2.shape, x2.dtype), jax.ShapeDtypeStruct(bias.shape, jnp.float32))
    return tuple(jax.ffi.ffi_call(_TARGETS[1], out, vmap_method="sequential")(x2, bias, dy.astype(x2.dtype)))


_native.defvjp(_native_fwd, _native_bwd)


def geglu(x: jax.Array, bias: jax.Array | None = None) -> jax.Array:
    """``h * gelu(gate)`` for ``h, gate = split(x + bias, 2, axis=-1)``, exact (erf) GELU.

    Args:
      x: ``[..., 2F]`` float32 or bfloat16: the GEGLU projection's product.
      bias: ``[2F]`` (the projection's bias; float32 on the native path, where it is added in float32),
        or None.
    Returns ``[..., F]`` of ``x.dtype``. Differentiable in ``x`` and ``bias``.
    """
    lead, f2 = x.shape[:-1], x.shape[-1]
    bias = jnp.zeros((f2,), jnp.float32) if bias is None else bias
    if bias.shape != (f2,):
        raise ValueError(f"geglu: bias must have shape ({f2},) for x of shape {x.shape}, got {bias.shape}")
    if not native_eligible(x.shape, x.dtype):
        return _reference(x, bias)
    x2 = x.reshape(-1, f2)
    y = jax.lax.platform_dependent(x2, bias.astype(jnp.float32), cpu=_native, default=_reference)
    return y.reshape(*lead, f2 // 2)
