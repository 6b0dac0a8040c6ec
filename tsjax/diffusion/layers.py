"""Building blocks shared by the Flax Stable Diffusion modules (UNet, VAE, CLIP text encoder).

Conventions (all modules of ``tsjax.diffusion``):

* Activations are **NHWC** (images/feature maps ``[B, H, W, C]``) or ``[B, N, C]`` (token sequences).
* Parameters are float32 (``param_dtype``); ``dtype`` is the *compute* dtype (float32 by default,
  ``jnp.bfloat16`` for mixed precision). Normalisation statistics are always computed in float32.
* Sub-module names follow the PyTorch (diffusers / transformers) module paths with list indices joined
  by ``_``: torch ``down_blocks.0.attentions.1.to_out.0.weight`` is Flax
  ``down_blocks_0/attentions_1/to_out_0/kernel``. ``tsjax.diffusion.convert`` relies on this.
* Numerics follow PyTorch: exact (erf) GELU, GroupNorm ``eps`` 1e-5 in UNet resnets, 1e-6 in the UNet
  transformer's input norm and everywhere in the VAE, LayerNorm ``eps`` 1e-5, two-pass variance.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.ops import attention as native_attention
from tsjax.ops import conv as native_conv
from tsjax.ops import group_norm as native_group_norm
from tsjax.ops import layer_norm as native_layer_norm
from tsjax.ops.geglu import geglu

Dtype = Any

__all__ = ["ATTENTION_IMPLS", "attention", "timestep_embedding", "group_norm", "LayerNorm", "Attention",
           "FeedForward", "BasicTransformerBlock", "Transformer2D", "ResnetBlock2D", "Downsample2D",
           "Upsample2D", "TimestepEmbedding", "GroupNorm", "dense", "conv", "config_from_dict"]

ATTENTION_IMPLS = ("auto", "xla", "cudnn", "einsum", "chunked", "native")


def _same_default(v: Any, default: Any) -> bool:
    """``v == default``, with ints and floats compared by value (diffusers writes ``1`` or ``1.0``)."""
    if isinstance(v, (int, float)) and isinstance(default, (int, float)) and not isinstance(v, bool):
        return float(v) == float(default)
    return v == default


def config_from_dict(cls: type, cfg: Mapping[str, Any], *, source: str, what: str,
                     defaults: Mapping[str, Any] | None = None, ignored: frozenset[str] | set[str] = frozenset(),
                     **extra: Any) -> Any:
    """Build the frozen config dataclass ``cls`` from a diffusers / transformers ``config.json`` dict.

    The one parsing loop behind ``UNetConfig.from_diffusers``, ``VAEConfig.from_diffusers`` and
    ``CLIPTextConfig.from_transformers``:

    * keys in ``defaults`` are accepted only at their default (inert) value (ints and floats compared by
      value) and then dropped; another value raises ``ValueError("{source}: {k}={v!r} is not supported by
      tsjax's {what} ...")``;
    * metadata keys (leading ``_``) and keys in ``ignored`` are dropped;
    * every other key must be a field of ``cls`` (else ``ValueError("{source}: unknown {what} config key
      ...")``); JSON lists become tuples (the dataclasses are hashable);
    * ``extra`` keyword arguments are passed to ``cls`` as they are (fields derived by the caller);
    * a ``ValueError`` from ``cls``'s validation is re-raised prefixed with ``source``.
    """
    cfg = dict(cfg)
    for k, default in (defaults or {}).items():
        if k in cfg:
            v = cfg.pop(k)
            if not _same_default(v, default):
                raise ValueError(f"{source}: {k}={v!r} is not supported by tsjax's {what} (expected {default!r})")
    fields = {f.name for f in dataclasses.fields(cls)}
    kw: dict[str, Any] = {}
    for k, v in cfg.items():
        if k.startswith("_") or k in ignored:
            continue
        if k not in fields or k in extra:
            raise ValueError(f"{source}: unknown {what} config key {k!r}")
        kw[k] = tuple(v) if isinstance(v, list) else v
    try:
        return cls(**kw, **extra)
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


# float32 dense layers ``[T, K] x [K, N]`` on the CPU (TSJAX_NATIVE_DENSE=0, read at trace time, keeps all
# three products on XLA):
# * the weight gradient ``x^T dy`` runs on the native kernels when ``N <= _NATIVE_DW_MAX_OUT``;
# * the value ``x w`` when ``T >= _NATIVE_MIN_ROWS`` and ``N <= _NATIVE_MAX_OUT``, and the input gradient
#   ``dy w^T`` when ``T >= _NATIVE_MIN_ROWS`` and ``K <= _NATIVE_MAX_OUT``;
# each of those sizes (N for the first two, K for the third) a multiple of 16.
_NATIVE_DW_MAX_OUT = 256
_NATIVE_MIN_ROWS = 2048
_NATIVE_MAX_OUT = 640


def _xla_nn(x, w):
    return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())))


def _xla_nt(dy, w):
    return jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())))


def _xla_tn(x, dy):
    return jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())))


def _product(native: bool, native_fn, xla_fn, a, b):
    """``native_fn(a, b)`` in CPU programs when ``native`` (``lax.platform_dependent``), else ``xla_fn``."""
    if not native:
        return xla_fn(a, b)
    return jax.lax.platform_dependent(a, b, cpu=native_fn, default=xla_fn)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _dense_native(x: jax.Array, w: jax.Array, route: tuple[bool, bool, bool]) -> jax.Array:
    """``x @ w`` (``[T, K] x [K, N]``, float32) whose value, input gradient and weight gradient run on tsjax's
    native kernels on the CPU where ``route`` (three booleans, in that order) says so
    (``tsjax.ops.conv.matmul_nn`` / ``matmul_nt`` / ``matmul_tn``: a 1x1 conv's forward, input gradient and
    kernel gradient), XLA's ``dot_general`` otherwise and on other platforms.

    Why (one Sapphire Rapids-class core, interleaved rounds, bench/README.md): XLA:CPU runs the weight
    gradient of the UNets' narrow layers (``N`` <= 256, ``T`` 128-2048) at 55-90 GFLOP/s, the packed native
    GEMM at 1.05-1.4x that (at ``N`` >= 512 XLA's is as fast or faster); the value and input gradient of
    the many-row layers (``T`` >= 2048 tokens, <= 640 outputs: the attention projections, ``proj_in`` /
    ``proj_out``, the feed-forward output) take 0.89-0.96x XLA's time on the native forward kernel, the
    wide GEGLU projections' value (1024-2560 outputs) 1.03-1.07x, so those keep XLA's."""
    return _product(route[0], native_conv.matmul_nn, _xla_nn, x, w)


def _dense_native_fwd(x, w, route):
    return _dense_native(x, w, route), (x, w)


def _dense_native_bwd(route, res, dy):
    x, w = res
    return (_product(route[1], native_conv.matmul_nt, _xla_nt, dy, w),
            _product(route[2], native_conv.matmul_tn, _xla_tn, x, dy))


_dense_native.defvjp(_dense_native_fwd, _dense_native_bwd)


@jax.custom_vjp
def _dense_bf16(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x @ w`` for bfloat16 ``[T, K] x [K, N]`` on the CPU: float32 accumulation, rounded to bf16, and
    a backward whose input gradient ``dy w^T`` is again a bf16 x bf16 -> f32 product.

    Why: differentiating ``dot(x, w, preferred_element_type=f32).astype(bf16)`` gives a float32 cotangent
    (the transpose of the cast) times a bf16 ``w``, which XLA:CPU upcasts to a float32 dot (plus a convert
    of each operand): 133-156 GFLOP/s on one Sapphire Rapids-class core, against 325-645 for the same
    product with bf16 operands (AMX). The weight gradient ``x^T dy`` is formed the same way (bf16 operands,
    float32 accumulation) as before."""
    return jax.lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32).astype(x.dtype)


def _dense_bf16_fwd(x, w):
    return _dense_bf16(x, w), (x, w)


def _dense_bf16_bwd(res, dy):
    x, w = res
    dy = dy.astype(x.dtype)
    f32 = jnp.float32
    dx = jax.lax.dot_general(dy, w, (((1,), (1,)), ((), ())), preferred_element_type=f32).astype(x.dtype)
    dw = jax.lax.dot_general(x, dy, (((0,), (0,)), ((), ())), preferred_element_type=f32).astype(w.dtype)
    return dx, dw


_dense_bf16.defvjp(_dense_bf16_fwd, _dense_bf16_bwd)


def _native_route(lhs, rhs, precision, preferred_element_type, kw) -> tuple[bool, bool, bool] | None:
    """Which of a ``[T, K] x [K, N]`` dense layer's (value, input gradient, weight gradient) products run on
    the native kernels (see ``_NATIVE_MIN_ROWS``), or None when none does."""
    if not (precision is None and preferred_element_type is None and not kw
            and lhs.dtype == rhs.dtype == jnp.float32
            and os.environ.get("TSJAX_NATIVE_DENSE", "1") != "0" and native_conv.native_available()):
        return None
    (t, k), n = lhs.shape, rhs.shape[1]
    many = t >= _NATIVE_MIN_ROWS
    route = (many and n % 16 == 0 and n <= _NATIVE_MAX_OUT, many and k % 16 == 0 and k <= _NATIVE_MAX_OUT,
             n % 16 == 0 and n <= _NATIVE_DW_MAX_OUT)
    return route if any(route) else None


def _dot_general(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None, **kw):
    """``lax.dot_general`` for ``nn.Dense``.

    * ``[..., K] x [K, N]`` with several leading dims runs as one ``[prod(...), K] x [K, N]`` GEMM (a free
      reshape). The weight gradient then contracts one dim, not two: with two, XLA's dot canonicalisation
      materialises ``dy`` transposed and runs the product in a transposed-operands form at 21-37 GFLOP/s
      on one Sapphire Rapids-class core, against 100+ for the one-dim form (the GEGLU projections'
      ``[2, 1024, 128]^T [2, 1024, 1024]`` alone took 87 ms of the mid UNet's forward+backward).
    * On the CPU, bfloat16 products accumulate into float32 and are rounded back (XLA:CPU runs bf16 x
      bf16 -> f32 dots on AMX / AVX512-BF16 where the CPU has them, but upcasts a bf16 -> bf16 dot to a
      float32 one: 71-93 vs 217-323 GFLOP/s on one Sapphire Rapids-class core); 2-D ones through
      ``_dense_bf16``, whose input gradient keeps bf16 operands.
    * float32 ``[T, K] x [K, N]``: ``_dense_native``, whose products run on the native kernels on the CPU
      where ``_native_route`` says (the weight gradient of narrow layers; the value and input gradient of
      many-row, narrow ones).

    Elsewhere, and for other dtypes, ``lax.dot_general`` as given."""
    (lc, rc), (lb, rb) = dimension_numbers
    if (lhs.ndim > 2 and rhs.ndim == 2 and tuple(lc) == (lhs.ndim - 1,) and tuple(rc) == (0,)
            and not lb and not rb):
        out = _dot_general(lhs.reshape(-1, lhs.shape[-1]), rhs, (((1,), (0,)), ((), ())), precision,
                           preferred_element_type, **kw)
        return out.reshape(*lhs.shape[:-1], out.shape[-1])
    if lhs.ndim == rhs.ndim == 2 and tuple(lc) == (1,) and tuple(rc) == (0,) and not lb and not rb:
        route = _native_route(lhs, rhs, precision, preferred_element_type, kw)
        if route is not None:
            return _dense_native(lhs, rhs, route)
    if (preferred_element_type is None and lhs.dtype == rhs.dtype == jnp.bfloat16
            and jax.default_backend() == "cpu"):
        if (lhs.ndim == rhs.ndim == 2 and tuple(lc) == (1,) and tuple(rc) == (0,) and not lb and not rb
                and precision is None and not kw):
            return _dense_bf16(lhs, rhs)
        out = jax.lax.dot_general(lhs, rhs, dimension_numbers, precision, preferred_element_type=jnp.float32, **kw)
        return out.astype(jnp.bfloat16)
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                               preferred_element_type=preferred_element_type, **kw)


def dense(features: int, name: str, dtype: Dtype, use_bias: bool = True) -> nn.Dense:
    """A float32-parameter ``nn.Dense`` (kernel ``[in, out]`` = torch ``weight.T``) computing in ``dtype``
    (bf16 on the CPU with float32 accumulation, ``_dot_general``)."""
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, dot_general=_dot_general,
                    name=name)


# 3x3 stride-1 "same" convs whose kernel gradient takes the per-tap GEMM path on CPU
# (``_conv3x3_tap_dw``): per-image map area x min(in, out channels) of at least _TAP_DW_MIN_WORK, and at
# least _TAP_DW_MIN_CHANNELS channels. Measured kernel gradient alone on ONE pinned core (XLA -> tap
# path): 1x512x512x128 2.81 -> 0.84 s (2 cores), 1x256x256x128 0.79 -> 0.30 s, 2x128x128x128 0.204 ->
# 0.151 s, 1x512x512x64 0.67 -> 0.49 s, 2x256x256x64 0.240 -> 0.232 s; but below the limit XLA's own is
# faster: 2x128x128x64 28 -> 49 ms, 2x96x96x128 65 -> 75 ms, 2x64x64x256 115 -> 122 ms.
_TAP_DW_MIN_WORK = 128 * 128 * 128
_TAP_DW_MIN_CHANNELS = 64


def _conv3x3(x: jax.Array, w: jax.Array) -> jax.Array:
    return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _tap_kernel_grad(x: jax.Array, dy: jax.Array) -> jax.Array:
    """Kernel gradient of ``_conv3x3`` as nine ``[B*H*W, Cin]^T @ [B*H*W, Cout]`` GEMMs -> ``[3, 3, Cin, Cout]``.

    The taps run in a ``lax.scan`` so only one shifted view of the padded input exists at a time (the
    unrolled form is as fast but holds all nine: 4.5x the temporary memory at 512x512). Accumulates in
    float32 whatever the compute dtype.
    """
    b, h, wd, cin = x.shape
    xp = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    dy2 = dy.reshape(-1, dy.shape[-1])

    def tap(_, k):
        view = jax.lax.dynamic_slice(xp, (0, k // 3, k % 3, 0), (b, h, wd, cin)).reshape(-1, cin)
        return None, jax.lax.dot_general(view, dy2, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)

    return jax.lax.scan(tap, None, jnp.arange(9))[1].reshape(3, 3, cin, dy.shape[-1])


@jax.custom_vjp
def _conv3x3_tap_dw(x: jax.Array, w: jax.Array) -> jax.Array:
    """NHWC x HWIO 3x3 stride-1 conv with padding 1 whose kernel gradient is ``_tap_kernel_grad`` on CPU.

    XLA:CPU lowers the kernel gradient of a large-map conv to a convolution whose window is the whole
    image, 2-4x slower than nine GEMMs (and than PyTorch's) at 256-512 px; on other platforms (cuDNN) the
    backward is XLA's own. The value and the input gradient are always XLA's.
    ``x`` ``[B, H, W, Cin]``, ``w`` ``[3, 3, Cin, Cout]`` -> ``[B, H, W, Cout]``.
    """
    return _conv3x3(x, w)


def _conv3x3_tap_dw_fwd(x, w):
    return _conv3x3(x, w), (x, w)


def _conv3x3_tap_dw_bwd(res, dy):
    def cpu(x, w, dy):  # XLA's input gradient, the per-tap kernel gradient
        return jax.vjp(lambda x_: _conv3x3(x_, w), x)[1](dy)[0], _tap_kernel_grad(x, dy).astype(w.dtype)

    def xla(x, w, dy):
        return jax.vjp(_conv3x3, x, w)[1](dy)

    return jax.lax.platform_dependent(*res, dy, cpu=cpu, default=xla)


_conv3x3_tap_dw.defvjp(_conv3x3_tap_dw_fwd, _conv3x3_tap_dw_bwd)


def _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision,
                kw) -> bool:
    """Whether an ``nn.Conv`` call is an undilated, ungrouped NHWC x HWIO conv with default precision."""
    if lhs.ndim != 4 or rhs.ndim != 4 or kw or precision is not None or feature_group_count != 1:
        return False
    if jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers) != \
            jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, ("NHWC", "HWIO", "NHWC")):
        return False
    return all(d is None or tuple(d) == (1, 1) for d in (lhs_dilation, rhs_dilation))


def _takes_tap_dw(lhs, rhs, window_strides, padding) -> bool:
    """Whether a plain NHWC conv is a large 3x3 stride-1 padding-1 conv (see the limits above)."""
    if rhs.shape[:2] != (3, 3) or tuple(window_strides) != (1, 1) or [tuple(p) for p in padding] != [(1, 1), (1, 1)]:
        return False
    ch = min(rhs.shape[2], rhs.shape[3])
    return ch >= _TAP_DW_MIN_CHANNELS and lhs.shape[1] * lhs.shape[2] * ch >= _TAP_DW_MIN_WORK


def _conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                          dimension_numbers=None, feature_group_count=1, precision=None, **kw):
    """``lax.conv_general_dilated`` for ``nn.Conv``. On the CPU, plain NHWC convs run tsjax's native kernels
    (``tsjax.ops.conv.conv2d``: forward and both gradients; float32, ``Cout`` a multiple of 16); where
    those are not available, large 3x3 "same" convs take ``_conv3x3_tap_dw``'s kernel gradient."""
    if _plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count, precision, kw) \
            and not isinstance(padding, str):
        if native_conv.native_eligible(lhs.shape, rhs.shape, lhs.dtype, rhs.dtype):
            return native_conv.conv2d(lhs, rhs, tuple(window_strides), tuple(tuple(p) for p in padding))
        if _takes_tap_dw(lhs, rhs, window_strides, padding):
            return _conv3x3_tap_dw(lhs, rhs)
    return jax.lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
                                        rhs_dilation=rhs_dilation, dimension_numbers=dimension_numbers,
                                        feature_group_count=feature_group_count, precision=precision, **kw)


def conv(features: int, kernel: int, name: str, dtype: Dtype, stride: int = 1, padding: Any = None) -> nn.Conv:
    """A float32-parameter ``nn.Conv`` (kernel HWIO = torch OIHW transposed); default padding ``k // 2``.

    On the CPU, float32 convs with ``features`` a multiple of 16 run tsjax's native kernels
    (``tsjax.ops.conv``); without them, large 3x3 stride-1 convs get a faster kernel gradient
    (``_conv3x3_tap_dw``). Everything else is ``lax.conv_general_dilated``.
    """
    p = kernel // 2 if padding is None else padding
    pad = ((p, p), (p, p)) if isinstance(p, int) else p
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=pad, dtype=dtype,
                   param_dtype=jnp.float32, conv_general_dilated=_conv_general_dilated, name=name)


class GroupNorm(nn.Module):
    """``torch.nn.GroupNorm`` on NHWC / ``[B, N, C]`` (params ``scale`` / ``bias``, as ``nn.GroupNorm``'s),
    float32 two-pass statistics of ``x`` as given (as ``nn.GroupNorm``), optionally followed by SiLU
    (``silu``); output cast to ``dtype``. On the CPU it runs tsjax's native fused kernels
    (``tsjax.ops.group_norm``)."""

    num_groups: int
    epsilon: float
    dtype: Dtype = jnp.float32
    silu: bool = False

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros, (c,), jnp.float32)
        y = native_group_norm.group_norm(x, scale, bias, groups=self.num_groups, eps=self.epsilon, silu=self.silu)
        return y.astype(self.dtype)


def group_norm(num_groups: int, epsilon: float, name: str, dtype: Dtype, silu: bool = False) -> GroupNorm:
    """:class:`GroupNorm` (``silu``: fused SiLU after the normalisation)."""
    return GroupNorm(num_groups=num_groups, epsilon=epsilon, dtype=dtype, silu=silu, name=name)


class _LayerNorm(nn.Module):
    """``torch.nn.LayerNorm`` over the last axis: ``nn.LayerNorm(use_fast_variance=False)``'s parameters
    (float32 ``scale`` ones, ``bias`` zeros) and numerics (float32 two-pass statistics, output in
    ``dtype``), computed by ``tsjax.ops.layer_norm`` (native kernels on the CPU)."""

    epsilon: float
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones_init(), (c,), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (c,), jnp.float32)
        x = x.astype(jnp.promote_types(x.dtype, self.dtype))  # bf16 data only when both are bf16
        return native_layer_norm.layer_norm(x, scale, bias, eps=self.epsilon).astype(self.dtype)


def LayerNorm(epsilon: float, name: str, dtype: Dtype) -> nn.Module:  # noqa: N802 (factory)
    """``torch.nn.LayerNorm`` over the last axis (params ``scale``/``bias``), float32 statistics; the
    kernels of ``tsjax.ops.layer_norm`` on the CPU."""
    return _LayerNorm(epsilon, dtype, name=name)


def _cudnn_ok(q: jax.Array, k: jax.Array) -> bool:
    """cuDNN flash attention: GPU, bf16/fp16, head dim a multiple of 8 and <= 128 (256 needs Hopper)."""
    return (jax.default_backend() == "gpu"
            and jnp.dtype(q.dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
            and q.shape[-1] % 8 == 0 and q.shape[-1] <= 128 and q.shape[-1] == k.shape[-1])


def _query_block(n: int, target: int = 16) -> int:
    """Largest power-of-two block ``<= target`` dividing ``n`` (``n`` itself when none >= 8 does).

    16 query rows per block keep a block's ``[B*H, 16, M]`` logits/weights in cache: on one pinned core the
    mid UNet's level-0 attention (B*H = 16, N = M = 1024, D = 16) takes 102-117 ms forward+backward with
    blocks of 8-16 against 185-208 ms with 128 (PyTorch SDPA: 79 ms); at SD size (B*H = 5, 4096 tokens,
    D = 64) 16 and 128 measure the same (1.52 s; PyTorch 1.00 s)."""
    b = target
    while b >= 8:
        if n % b == 0:
            return b
        b //= 2
    return n


def _to_bh(x: jax.Array) -> jax.Array:
    """``[B, N, H, D] -> [B*H, N, D]``."""
    b, n, h, d = x.shape
    return x.transpose(0, 2, 1, 3).reshape(b * h, n, d)


def _from_bh(x: jax.Array, b: int, h: int) -> jax.Array:
    """``[B*H, N, D] -> [B, N, H, D]``."""
    return x.reshape(b, h, x.shape[1], x.shape[2]).transpose(0, 2, 1, 3)


def _q_blocks(x: jax.Array, block: int) -> jax.Array:
    """``[B*H, N, D] -> [N/block, B*H, block, D]`` (query blocks as the scan axis)."""
    bh, n, d = x.shape
    return x.reshape(bh, n // block, block, d).transpose(1, 0, 2, 3)


def _q_unblock(x: jax.Array) -> jax.Array:
    """Inverse of ``_q_blocks``."""
    nb, bh, block, d = x.shape
    return x.transpose(1, 0, 2, 3).reshape(bh, nb * block, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _chunked_attention(q: jax.Array, k: jax.Array, v: jax.Array, block: int) -> jax.Array:
    """Float32 attention over query blocks of ``block`` rows, ``[B*H, N, D]`` each (no mask).

    The forward keeps per row only the output and the log-sum-exp of the logits; the backward recomputes
    each block's softmax from them (flash-attention style), so the ``[N, M]`` weights are never stored
    whole. On XLA:CPU this is ~1.7x faster than differentiating the full-matrix softmax and far lighter.
    """
    return _chunked_fwd(q, k, v, block)[0]


def _chunked_fwd(q, k, v, block):
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt = k.swapaxes(-1, -2)

    def one(qb):
        logits = jnp.matmul(qb * scale, kt)
        mx = jnp.max(logits, axis=-1, keepdims=True)
        e = jnp.exp(logits - mx)
        z = jnp.sum(e, axis=-1, keepdims=True)
        return jnp.matmul(e, v) / z, mx + jnp.log(z)

    o, lse = jax.lax.map(one, _q_blocks(q, block))
    out = _q_unblock(o)
    return out, (q, k, v, out, lse)


def _chunked_bwd(block, res, dout):
    q, k, v, out, lse = res
    scale = 1.0 / math.sqrt(q.shape[-1])
    kt, vt = k.swapaxes(-1, -2), v.swapaxes(-1, -2)

    def one(carry, xs):
        dk, dv = carry
        qb, dob, ob, lb = xs
        p = jnp.exp(jnp.matmul(qb * scale, kt) - lb)                   # softmax weights of the block
        dv = dv + jnp.matmul(p.swapaxes(-1, -2), dob)
        dp = jnp.matmul(dob, vt)
        ds = p * (dp - jnp.sum(dob * ob, axis=-1, keepdims=True)) * scale
        return (dk + jnp.matmul(ds.swapaxes(-1, -2), qb), dv), jnp.matmul(ds, k)

    xs = (_q_blocks(q, block), _q_blocks(dout, block), _q_blocks(out, block), lse)
    (dk, dv), dq = jax.lax.scan(one, (jnp.zeros_like(k), jnp.zeros_like(v)), xs)
    return _q_unblock(dq), dk, dv


_chunked_attention.defvjp(_chunked_fwd, _chunked_bwd)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, impl: str = "auto", is_causal: bool = False) -> jax.Array:
    """Scaled dot-product attention ``softmax(q k^T / sqrt(D)) v``.

    Args:
      q: ``[B, N, H, D]``; k, v: ``[B, M, H, D]`` (same dtype).
      impl: ``"xla"`` / ``"cudnn"`` (``jax.nn.dot_product_attention`` with that implementation; both take
        the logits and softmax in float32), ``"einsum"`` (explicit einsums, float32 logits/softmax; the
        path to read or to use where ``dot_product_attention`` is unavailable), ``"native"`` (tsjax's CPU
        flash-attention kernels, ``tsjax.ops.attention``; float32), or ``"auto"``: cuDNN flash attention
        on GPU for bf16/fp16 inputs whose head dim it supports (falling back to XLA if cuDNN rejects the
        call); on CPU for non-causal attention the native kernels where they take the head size
        (``tsjax.ops.attention.native_eligible``), else ``"chunked"`` over more than 256 queries (query
        blocks of <= 16 rows, float32, custom flash-style backward: ~1.7x faster fwd+bwd than the
        full-matrix softmax on XLA:CPU); XLA otherwise.
      is_causal: mask keys after the query position (``N == M``).
    Returns ``[B, N, H, D]`` in ``q.dtype``.
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention implementation must be one of {ATTENTION_IMPLS}, got {impl!r}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    if impl == "einsum":
        logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * scale
        if is_causal:
            n, m = logits.shape[-2:]
            logits = jnp.where(jnp.tril(jnp.ones((n, m), bool)), logits, jnp.finfo(jnp.float32).min)
        w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        return jnp.einsum("bhnm,bmhd->bnhd", w, v)
    if impl == "auto":
        if _cudnn_ok(q, k):
            try:
                return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal,
                                                    implementation="cudnn")
            except (NotImplementedError, RuntimeError, ValueError):
                pass  # shape/version cuDNN does not support: XLA below
        impl = "xla"
        if jax.default_backend() == "cpu" and not is_causal:
            impl = "native" if native_attention.native_eligible(q.shape, k.shape) else \
                "chunked" if q.shape[1] > 256 else "xla"
    if impl == "native":
        if is_causal:
            raise ValueError("attention: impl='native' has no causal mask; use 'xla' or 'einsum'")
        return native_attention.flash_attention(q, k, v)
    if impl == "chunked":
        if is_causal:
            raise ValueError("attention: impl='chunked' has no causal mask; use 'xla' or 'einsum'")
        b, h = q.shape[0], q.shape[2]
        f32 = [_to_bh(a.astype(jnp.float32)) for a in (q, k, v)]
        return _from_bh(_chunked_attention(*f32, _query_block(q.shape[1])), b, h).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=is_causal, implementation=impl)


def timestep_embedding(timesteps: jax.Array, dim: int, flip_sin_to_cos: bool, freq_shift: float,
                       max_period: float = 10000.0) -> jax.Array:
    """Sinusoidal timestep features as diffusers' ``get_timestep_embedding`` (float32).

    ``freqs_i = exp(-ln(max_period) * i / (dim/2 - freq_shift))``; output ``[sin(t f), cos(t f)]`` (or
    ``[cos, sin]`` with ``flip_sin_to_cos``), zero-padded to ``dim`` when ``dim`` is odd. Frequencies agree
    with torch's to an ulp, so features at step ``t`` agree to about ``t * 1.2e-7``.
    ``timesteps``: ``[B]`` (int or float, may be fractional). Returns ``[B, dim]`` float32.
    """
    half = dim // 2
    # Constant frequencies: the float32 exponent as torch computes it, exp correctly rounded (float64).
    exponent = (-math.log(max_period) * np.arange(half, dtype=np.float32)).astype(np.float32)
    exponent = exponent / np.float32(half - freq_shift)
    freqs = jnp.asarray(np.exp(exponent.astype(np.float64)).astype(np.float32))
    emb = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class TimestepEmbedding(nn.Module):
    """diffusers ``TimestepEmbedding``: ``linear_2(silu(linear_1(x)))``, ``[B, in] -> [B, features]``.

    Also used as the camera embedding (``in`` = 16, the flattened row-major camera-to-world matrix).
    """

    features: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.features, "linear_1", self.dtype)(x)
        return dense(self.features, "linear_2", self.dtype)(nn.silu(x))


class Attention(nn.Module):
    """diffusers ``Attention`` (``to_q``, ``to_k``, ``to_v``, ``to_out.0``) on token sequences.

    ``x`` ``[B, N, C]``; ``context`` ``[B, M, Cc]`` (cross-attention) or None (self-attention).
    Returns ``[B, N, out_dim]`` (``out_dim`` defaults to ``C``). ``qkv_bias``: SD UNets have none, the VAE
    mid-block attention has them.
    """

    heads: int
    dim_head: int
    out_dim: int | None = None
    qkv_bias: bool = False
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context=None):
        inner = self.heads * self.dim_head
        ctx = x if context is None else context
        b, n = x.shape[:2]
        m = ctx.shape[1]
        q = dense(inner, "to_q", self.dtype, self.qkv_bias)(x).reshape(b, n, self.heads, self.dim_head)
        k = dense(inner, "to_k", self.dtype, self.qkv_bias)(ctx).reshape(b, m, self.heads, self.dim_head)
        v = dense(inner, "to_v", self.dtype, self.qkv_bias)(ctx).reshape(b, m, self.heads, self.dim_head)
        o = attention(q, k, v, impl=self.impl).reshape(b, n, inner)
        return dense(self.out_dim or x.shape[-1], "to_out_0", self.dtype)(o)


class _ProductAndBias(nn.Module):
    """``nn.Dense``'s parameters (``kernel [in, out]`` lecun-normal, ``bias [out]`` zeros, float32) and
    its product ``x @ kernel`` in ``dtype``, with the bias returned unadded (float32) for a consumer that
    adds it itself."""

    features: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (x.shape[-1], self.features), jnp.float32)
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
        x, k = x.astype(self.dtype), kernel.astype(self.dtype)
        return _dot_general(x, k, (((x.ndim - 1,), (0,)), ((), ()))), bias


class _GEGLU(nn.Module):
    inner: int
    dtype: Dtype

    @nn.compact
    def __call__(self, x):
        # h * gelu(gate) of the split projection (bias added inside), exact GELU: tsjax.ops.geglu, native
        # kernels on the CPU
        return geglu(*_ProductAndBias(2 * self.inner, self.dtype, name="proj")(x))


class FeedForward(nn.Module):
    """diffusers ``FeedForward`` with GEGLU (``net.0.proj``: C -> 2 * mult * C, ``net.2``: mult * C -> C)."""

    mult: int = 4
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        h = _GEGLU(self.mult * dim, self.dtype, name="net_0")(x)
        return dense(dim, "net_2", self.dtype)(h)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention, GEGLU feed-forward, each pre-LayerNorm (eps 1e-5) and residual.

    ``x`` ``[B, N, C]`` with ``C = heads * dim_head``; ``context`` ``[B, M, cross_attention_dim]``.
    """

    heads: int
    dim_head: int
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        a = dict(heads=self.heads, dim_head=self.dim_head, impl=self.impl, dtype=self.dtype)
        x = x + Attention(**a, name="attn1")(LayerNorm(1e-5, "norm1", self.dtype)(x))
        x = x + Attention(**a, name="attn2")(LayerNorm(1e-5, "norm2", self.dtype)(x), context)
        return x + FeedForward(dtype=self.dtype, name="ff")(LayerNorm(1e-5, "norm3", self.dtype)(x))


class Transformer2D(nn.Module):
    """diffusers ``Transformer2DModel`` (continuous input) on NHWC maps: ``[B, H, W, C] -> [B, H, W, C]``.

    GroupNorm (eps 1e-6) -> ``proj_in`` (1x1 conv, or Linear after flattening when ``use_linear_projection``,
    SD 2.x) -> ``depth`` transformer blocks -> ``proj_out`` -> residual.
    """

    heads: int
    dim_head: int
    depth: int = 1
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    impl: str = "auto"
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, context):
        b, h, w, c = x.shape
        inner = self.heads * self.dim_head
        y = group_norm(self.norm_num_groups, 1e-6, "norm", self.dtype)(x)
        if self.use_linear_projection:
            y = dense(inner, "proj_in", self.dtype)(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, "proj_in", self.dtype)(y).reshape(b, h * w, inner)
        for i in range(self.depth):
            y = BasicTransformerBlock(self.heads, self.dim_head, self.impl, self.dtype,
                                      name=f"transformer_blocks_{i}")(y, context)
        if self.use_linear_projection:
            y = dense(c, "proj_out", self.dtype)(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, "proj_out", self.dtype)(y.reshape(b, h, w, inner))
        return y + x


class ResnetBlock2D(nn.Module):
    """diffusers ``ResnetBlock2D`` (``resnet_time_scale_shift="default"``, output scale 1).

    ``x`` ``[B, H, W, Cin]``, ``temb`` ``[B, T]`` or None -> ``[B, H, W, out_channels]``;
    ``conv_shortcut`` (1x1) exists iff ``Cin != out_channels``.
    """

    out_channels: int
    groups: int = 32
    eps: float = 1e-5
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = group_norm(self.groups, self.eps, "norm1", self.dtype, silu=True)(x)
        h = conv(self.out_channels, 3, "conv1", self.dtype)(h)
        if temb is not None:
            h = h + dense(self.out_channels, "time_emb_proj", self.dtype)(nn.silu(temb))[:, None, None, :]
        h = group_norm(self.groups, self.eps, "norm2", self.dtype, silu=True)(h)
        h = conv(self.out_channels, 3, "conv2", self.dtype)(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", self.dtype)(x)
        return x + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv (``conv``). ``padding``: 1 = symmetric (UNet), 0 = pad right/bottom by one (VAE)."""

    channels: int
    padding: int = 1
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((1, 1), (1, 1)) if self.padding == 1 else ((0, 1), (0, 1))
        return conv(self.channels, 3, "conv", self.dtype, stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """Nearest-neighbour 2x upsampling then 3x3 conv (``conv``): ``[B,H,W,C] -> [B,2H,2W,channels]``."""

    channels: int
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return conv(self.channels, 3, "conv", self.dtype)(x)
