"""2-D convolution (NHWC x HWIO) that runs tsjax's native kernels on the CPU.

XLA:CPU computes a convolution's forward at about oneDNN's (PyTorch's) speed, but its gradients, above
all the kernel gradient of a 3x3 conv on a large map, 1.5-3x slower (bench/README.md, "Native CPU
convolution"). :func:`conv2d` has the semantics of ``lax.conv_general_dilated`` with NHWC / HWIO /
NHWC dimension numbers, no dilation and one feature group, and on the CPU runs all three parts as XLA
FFI calls into ``csrc/kernels/conv_cpu*.cc`` (AVX-512F or AVX2+FMA, chosen at run time):

* forward ``y = conv(x, w)``: an indirect GEMM that reads the rows of ``x`` in place (no im2col);
* input gradient (stride 1): the forward of ``dy`` with the spatially flipped, in/out-transposed kernel
  and padding ``k - 1 - p``, the kernel read that way by the kernels themselves; strided (float32): one
  such stride-1 conv per output phase with that phase's taps, interleaved (a ``Cin`` that is not a
  multiple of 16: XLA's);
* kernel gradient: ``dw[i, j] = sum over pixels of x[shifted]^T dy``, in the same micro-kernels, every tap
  summed in one pass over the pixels (128-pixel chunks read while in cache); a 1x1 stride-1 unpadded
  conv's is one GEMM, run with both operands copied into contiguous blocks first (also
  :func:`matmul_tn`, the weight gradient of ``tsjax.diffusion.layers``' narrow dense layers).

:func:`matmul_nn` / :func:`matmul_nt` are a 1x1 conv's forward / input gradient over ``T`` pixels: the
dense layers' ``x w`` and ``dy w^T`` on the same kernels (``tsjax.diffusion.layers`` sends the many-row,
narrow ones there).

float32, float32 accumulation; results do not depend on the thread count. bfloat16 operands of a stride-1
conv run on Intel AMX tiles where the CPU has them (``_ffi.cpu_amx_bf16``: forward and input gradient
in bf16 with float32 accumulation, the kernel gradient through the float32 kernel); those of a strided
conv (the VAE's downsamplers) run on the float32 kernels on float32 copies, rounded back to bf16 (XLA's
bf16 strided conv and its base-dilated input gradient ran at ~30 GFLOP/s in the stage-2 guidance);
other bf16 convs are XLA's. On other platforms
(GPU: cuDNN) ``lax.platform_dependent`` selects ``lax.conv_general_dilated`` and its own gradients.
Under ``vmap`` the native calls run once per mapped element.

**Winograd.** :func:`algorithm` (a context manager, read when a function is traced; default: the
``TSJAX_CONV_ALGORITHM`` environment variable, else ``"direct"``) selects Winograd's minimal filtering
for float32 3x3 stride-1 convs: ``"winograd2"`` is F(2x2, 3x3) (2.25x fewer multiplies, rounding no
worse than the direct kernels'), ``"winograd4"`` F(4x4, 3x3) (4x fewer multiplies, 10-50x the direct
rounding: up to ~2.4e-5 of the output scale in the tests). It applies to the forward and to the input
gradient (the same kernel, flipped) of convs whose channel counts are multiples of 16 and whose output
covers at least :data:`WINOGRAD_MIN_PIXELS` pixels over the batch (below that, transforming the kernel
costs more than it saves; ``"winograd4"`` takes F(2x2, 3x3) between the two thresholds); the kernel
gradient stays direct. ``tsjax.config.PerfConfig.conv_algorithm`` sets it for the stage-2 step.

``TSJAX_NATIVE_CONV=0`` (read when a function is traced) turns the native path off;
``TSJAX_CPU_THREADS`` / ``TSJAX_CPU_ISA`` are read by the kernels (csrc/ffi/conv_cpu_ffi.cc).
"""
from __future__ import annotations

import contextlib
import contextvars
import functools
import os

import jax
import jax.numpy as jnp

from tsjax.config import CONV_ALGORITHMS

__all__ = ["ALGORITHMS", "WINOGRAD_MIN_PIXELS", "algorithm", "conv2d", "current_algorithm", "matmul_nn",
           "matmul_nt", "matmul_tn", "native_available", "native_eligible", "winograd_tile"]

#: Convolution algorithms :func:`algorithm` accepts (see the module docstring); the same tuple validates
#: ``PerfConfig.conv_algorithm``.
ALGORITHMS = CONV_ALGORITHMS
#: Winograd F(m x m, 3 x 3) is used only where a conv's output has at least this many pixels (batch x
#: height x width), per tile size m. Below, the kernel transform (alpha^2 * Cin * Cout floats written per
#: call) costs about what the multiplies save. One thread, forward / input gradient against the direct
#: kernels: 2x8x8x512 (128 px) F(2) 1.15x slower, F(4) 1.9x slower; 1x16x16x640 (256 px) F(2) 1.2x slower
#: forward; 2x16x16x640 (512 px) F(2) 0.76, F(4) 0.85; 2x32x32x128 (2048 px) F(2) 0.59, F(4) 0.51.
WINOGRAD_MIN_PIXELS = {2: 512, 4: 1024}
_ALGORITHM: contextvars.ContextVar[str | None] = contextvars.ContextVar("tsjax_conv_algorithm", default=None)


def _check_algorithm(name: str) -> str:
    if name not in ALGORITHMS:
        raise ValueError(f"conv algorithm {name!r} is not one of {', '.join(ALGORITHMS)}")
    return name


@contextlib.contextmanager
def algorithm(name: str):
    """Use convolution algorithm ``name`` (one of :data:`ALGORITHMS`) in :func:`conv2d` calls traced inside
    the ``with`` block (the choice is made at trace time: wrap the code that calls the network while
    ``jax.jit`` traces it, not the call of an already compiled function)."""
    token = _ALGORITHM.set(_check_algorithm(name))
    try:
        yield
    finally:
        _ALGORITHM.reset(token)


def current_algorithm() -> str:
    """The algorithm :func:`conv2d` uses now: the innermost :func:`algorithm` block's, else
    ``TSJAX_CONV_ALGORITHM``, else ``"direct"``."""
    name = _ALGORITHM.get()
    return _check_algorithm(name if name is not None else os.environ.get("TSJAX_CONV_ALGORITHM", "direct"))


def winograd_tile(algo: str, kernel_hw, stride, ci: int, co: int, pixels: int, dtype) -> int:
    """Winograd output-tile size ``m`` (2 or 4) that a float32 native conv with these properties runs with
    under ``algo``, or 0 (direct): 3x3 kernel, stride 1, ``ci`` and ``co`` multiples of 16, at least
    ``WINOGRAD_MIN_PIXELS[m]`` output pixels (``"winograd4"`` takes m = 2 where only that threshold is
    met), and the kernels built with the Winograd target."""
    if algo == "direct" or tuple(kernel_hw) != (3, 3) or tuple(stride) != (1, 1) or ci % 16 or co % 16:
        return 0
    if jnp.dtype(dtype) != jnp.float32:
        return 0
    m = next((m for m in range(int(algo[-1]), 0, -2) if pixels >= WINOGRAD_MIN_PIXELS[m]), 0)
    from tsjax.ops import _ffi

    return m if m and _ffi.targets_registered(_ffi._CONV_WINOGRAD_TARGET) else 0

Padding = tuple[tuple[int, int], tuple[int, int]]
_DN = ("NHWC", "HWIO", "NHWC")


def native_available() -> bool:
    """True when the native CPU kernels are built and usable on this CPU and not turned off
    (``TSJAX_NATIVE_CONV=0``). Says nothing about the default backend: :func:`conv2d` uses them only
    in programs compiled for the CPU."""
    if os.environ.get("TSJAX_NATIVE_CONV", "1") == "0":
        return False
    from tsjax.ops import _ffi

    return _ffi.cpu_isa() > 0


def native_eligible(x_shape, w_shape, x_dtype, w_dtype, stride=(1, 1)) -> bool:
    """Whether :func:`conv2d` takes the native path for these operands: rank-4, output channels a
    multiple of 16, the kernels available, and float32 operands, or bfloat16 operands (stride 1 on a CPU
    with AMX-BF16: AMX tiles; other strides: the float32 kernels on float32 copies, see :func:`conv2d`)."""
    return _route(x_shape, w_shape, x_dtype, w_dtype, stride) is not None


def _route(x_shape, w_shape, x_dtype, w_dtype, stride) -> str | None:
    """``"f32"`` (float32 kernels), ``"amx"`` (bf16 on AMX tiles), ``"f32_cast"`` (bf16 operands of a
    strided conv, run by the float32 kernels on float32 copies) or None (XLA's convolution)."""
    if not (len(x_shape) == 4 and len(w_shape) == 4 and w_shape[3] % 16 == 0 and x_shape[3] == w_shape[2]
            and jnp.dtype(x_dtype) == jnp.dtype(w_dtype) and native_available()):
        return None
    if jnp.dtype(x_dtype) == jnp.float32:
        return "f32"
    if jnp.dtype(x_dtype) != jnp.bfloat16:
        return None
    if tuple(stride) != (1, 1):
        return "f32_cast"
    from tsjax.ops import _ffi

    return "amx" if _ffi.cpu_amx_bf16() else None


def _xla_conv(x, w, stride, padding):
    return jax.lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=_DN)


def _out_hw(x_shape, w_shape, stride, padding):
    return tuple((x_shape[1 + a] + padding[a][0] + padding[a][1] - w_shape[a]) // stride[a] + 1 for a in range(2))


def _native_forward(x, w, stride, padding, out_hw=None, flip=False, algo="direct"):
    """The forward call; ``out_hw`` (default: from ``padding``) sets the trailing padding implicitly;
    ``flip``: ``w`` is the ``[KH, KW, Cout, Cin]`` kernel of the transposed conv, used spatially flipped
    (the input gradient's kernel, without a transposed copy); ``algo``: see :func:`winograd_tile`."""
    co = w.shape[2] if flip else w.shape[3]
    ho, wo = out_hw or _out_hw(x.shape, w.shape, stride, padding)
    out = jax.ShapeDtypeStruct((x.shape[0], ho, wo, co), jnp.float32)
    m = winograd_tile(algo, w.shape[:2], stride, x.shape[3], co, x.shape[0] * ho * wo, x.dtype)
    if m:
        return jax.ffi.ffi_call("tsjax_conv_forward_winograd", out, vmap_method="sequential")(
            x, w, ph=padding[0][0], pw=padding[1][0], flip=flip, m=m)
    return jax.ffi.ffi_call("tsjax_conv_forward", out, vmap_method="sequential")(
        x, w, sh=stride[0], sw=stride[1], ph=padding[0][0], pw=padding[1][0], flip=flip)


def _amx_forward(x, w, padding, out_hw=None, flip=False):
    """bf16 stride-1 forward on AMX tiles (bf16 out, float32 accumulation); arguments as
    :func:`_native_forward`'s."""
    co = w.shape[2] if flip else w.shape[3]
    ho, wo = out_hw or _out_hw(x.shape, w.shape, (1, 1), padding)
    out = jax.ShapeDtypeStruct((x.shape[0], ho, wo, co), jnp.bfloat16)
    return jax.ffi.ffi_call("tsjax_conv_forward_bf16", out, vmap_method="sequential")(
        x, w, ph=padding[0][0], pw=padding[1][0], flip=flip)


def _native_kernel_grad(x, dy, w_shape, stride, padding):
    out = jax.ShapeDtypeStruct(tuple(w_shape), jnp.float32)
    return jax.ffi.ffi_call("tsjax_conv_kernel_grad", out, vmap_method="sequential")(
        x, dy, sh=stride[0], sw=stride[1], ph=padding[0][0], pw=padding[1][0])


def matmul_tn(x: jax.Array, dy: jax.Array) -> jax.Array:
    """``x^T dy`` on the native kernels: ``x`` ``[T, K]``, ``dy`` ``[T, N]``, float32, ``N`` a multiple of 16
    -> ``[K, N]`` float32 (a dense layer's weight gradient). It is the kernel gradient of a 1x1 conv over
    ``T`` pixels, which the kernels run as a packed GEMM (``DenseKernelGrad`` in csrc/kernels/conv_cpu.cc).
    CPU programs only (select it with ``lax.platform_dependent``); see :func:`native_available`."""
    (t, k), n = x.shape, dy.shape[1]
    return _native_kernel_grad(x.reshape(1, 1, t, k), dy.reshape(1, 1, t, n), (1, 1, k, n), (1, 1),
                               ((0, 0), (0, 0))).reshape(k, n)


def matmul_nn(x: jax.Array, w: jax.Array) -> jax.Array:
    """``x w`` on the native kernels: ``x`` ``[T, K]``, ``w`` ``[K, N]``, float32, ``N`` a multiple of 16 ->
    ``[T, N]`` float32 (a dense layer's value): the forward of a 1x1 conv over ``T`` pixels (packed weight
    panels, rows of ``x`` read in place). CPU programs only, as :func:`matmul_tn`."""
    (t, k), n = x.shape, w.shape[1]
    return _native_forward(x.reshape(1, 1, t, k), w.reshape(1, 1, k, n), (1, 1), ((0, 0), (0, 0))).reshape(t, n)


def matmul_nt(dy: jax.Array, w: jax.Array) -> jax.Array:
    """``dy w^T`` on the native kernels: ``dy`` ``[T, N]``, ``w`` ``[K, N]``, float32, ``K`` a multiple of 16
    -> ``[T, K]`` float32 (a dense layer's input gradient): the input gradient of a 1x1 conv, ``w`` read
    transposed by the kernels' weight packing (no transposed copy). CPU programs only, as :func:`matmul_tn`."""
    (t, n), k = dy.shape, w.shape[0]
    return _native_forward(dy.reshape(1, 1, t, n), w.reshape(1, 1, k, n), (1, 1), ((0, 0), (0, 0)),
                           flip=True).reshape(t, k)


def _strided_input_grad(dy, w, stride, padding, x_hw):
    """Input gradient of a strided float32 conv as ``sh * sw`` stride-1 native convs, one per output phase.

    Input row ``h = sh * u + r`` receives ``dy[u + c - m] * w[i0 + sh * m]`` for the taps ``i = i0 + sh * m``
    with ``i = (r + ph) mod sh`` and ``c = (r + ph - i0) / sh``: a stride-1 correlation of ``dy`` with that
    phase's taps in reverse order (the kernels' ``flip`` mode, which also transposes the channels), so no
    multiply is spent on the zeros that XLA's base-dilated convolution inserts. The phases are computed at
    ``ceil(H / sh)`` rows each, interleaved by one transpose and cropped to ``x_hw``.
    ``dy`` ``[B, Ho, Wo, Cout]``, ``w`` ``[KH, KW, Cin, Cout]`` -> ``[B, H, W, Cin]``.
    """
    b, ci = dy.shape[0], w.shape[2]
    n_out = [-(-x_hw[a] // stride[a]) for a in range(2)]  # rows / columns per phase

    def axis_plan(a, r):
        """(first tap, tap count, leading crop of dy, leading zero padding) of phase r along axis a."""
        i0 = (r + padding[a][0]) % stride[a]
        m = len(range(i0, w.shape[a], stride[a]))
        lead = m - 1 - (r + padding[a][0] - i0) // stride[a]
        return i0, m, max(0, -lead), max(0, lead)

    rows = []
    for rh in range(stride[0]):
        cols = []
        for rw in range(stride[1]):
            (ih, mh, cut_h, pad_h), (iw, mw, cut_w, pad_w) = axis_plan(0, rh), axis_plan(1, rw)
            if mh == 0 or mw == 0:  # no tap lands on this phase (kernel smaller than the stride)
                cols.append(jnp.zeros((b, *n_out, ci), jnp.float32))
                continue
            sub = w[ih::stride[0], iw::stride[1]]  # [mh, mw, Cin, Cout], used flipped: Cout -> Cin
            cols.append(_native_forward(dy[:, cut_h:, cut_w:], sub, (1, 1), ((pad_h, 0), (pad_w, 0)),
                                        out_hw=tuple(n_out), flip=True))
        rows.append(jnp.stack(cols, axis=3))  # [B, U, V, sw, Cin]
    dx = jnp.stack(rows, axis=2)  # [B, U, sh, V, sw, Cin]
    dx = dx.reshape(b, n_out[0] * stride[0], n_out[1] * stride[1], ci)
    return dx[:, :x_hw[0], :x_hw[1]]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _native_conv(x, w, stride, padding, algo="direct"):
    return _native_forward(x, w, stride, padding, algo=algo)


def _native_conv_fwd(x, w, stride, padding, algo="direct"):
    return _native_forward(x, w, stride, padding, algo=algo), (x, w)


def _native_conv_bwd(stride, padding, algo, res, dy):
    x, w = res
    kh, kw, ci, _ = w.shape
    if stride == (1, 1) and ci % 16 == 0:
        back = ((kh - 1 - padding[0][0], 0), (kw - 1 - padding[1][0], 0))  # trailing: from out_hw
        forward = (_amx_forward if x.dtype == jnp.bfloat16
                   else functools.partial(_native_forward, stride=(1, 1), algo=algo))
        dx = forward(dy.astype(x.dtype), w, padding=back, out_hw=x.shape[1:3], flip=True)
    elif ci % 16 == 0 and x.dtype == jnp.float32 and max(padding[0][0], padding[1][0]) < max(kh, kw):
        dx = _strided_input_grad(dy, w, stride, padding, x.shape[1:3])
    else:
        dx = jax.vjp(lambda x_: _xla_conv(x_, w, stride, padding), x)[1](dy)[0]
    f32 = jnp.float32
    return dx, _native_kernel_grad(x.astype(f32), dy.astype(f32), w.shape, stride, padding).astype(w.dtype)


_native_conv.defvjp(_native_conv_fwd, _native_conv_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _amx_conv(x, w, padding):
    return _amx_forward(x, w, padding)


def _amx_conv_fwd(x, w, padding):
    return _amx_forward(x, w, padding), (x, w)


def _amx_conv_bwd(padding, res, dy):
    return _native_conv_bwd((1, 1), padding, "direct", res, dy)


_amx_conv.defvjp(_amx_conv_fwd, _amx_conv_bwd)


def conv2d(x: jax.Array, w: jax.Array, stride: tuple[int, int] = (1, 1),
           padding: Padding = ((1, 1), (1, 1))) -> jax.Array:
    """``lax.conv_general_dilated(x, w, stride, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"))``.

    Args:
      x: ``[B, H, W, Cin]``; w: ``[KH, KW, Cin, Cout]``, both float32 (or both bfloat16: AMX at stride 1,
        the float32 kernels on float32 copies otherwise),
        ``Cout`` a multiple of 16 (see :func:`native_eligible`; other operands go to XLA's convolution
        unchanged).
      stride: ``(sh, sw)``; padding: ``((top, bottom), (left, right))``, each >= 0.
    Returns ``[B, Ho, Wo, Cout]`` in the operands' dtype, ``Ho = (H + top + bottom - KH) // sh + 1``
    (likewise ``Wo``). Differentiable in ``x`` and ``w``. The algorithm (direct or Winograd) is
    :func:`current_algorithm`'s at trace time.
    """
    stride = tuple(int(s) for s in stride)
    padding = tuple((int(a), int(b)) for a, b in padding)
    route = None if min(min(p) for p in padding) < 0 else _route(x.shape, w.shape, x.dtype, w.dtype, stride)
    if route is None:
        return _xla_conv(x, w, stride, padding)
    if route == "amx":
        native = lambda x_, w_: _amx_conv(x_, w_, padding)  # noqa: E731
    elif route == "f32_cast":
        f32 = jnp.float32
        native = lambda x_, w_: _native_conv(x_.astype(f32), w_.astype(f32), stride, padding).astype(x.dtype)  # noqa: E731
    else:
        algo = current_algorithm()
        native = lambda x_, w_: _native_conv(x_, w_, stride, padding, algo)  # noqa: E731
    return jax.lax.platform_dependent(x, w, cpu=native, default=lambda x_, w_: _xla_conv(x_, w_, stride, padding))
