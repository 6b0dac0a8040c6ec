"""Native CPU convolution (tsjax.ops.conv): values and both gradients against a float64 reference and
XLA's convolution, finite differences, both instruction sets, thread-count invariance, vmap, and the
routing of ``tsjax.diffusion.layers.conv``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tsjax.ops import _ffi
from tsjax.ops import conv as C

pytestmark = pytest.mark.skipif(not C.native_available(),
                                reason="native conv kernels not built or this CPU lacks AVX2+FMA")

# (B, H, W, Cin, Cout, k, stride, padding): 3x3 "same", odd sizes, stride 2 with symmetric and VAE-style
# (0, 1) padding, Cin = 3 (input gradient through XLA), 1x1, partial 64-channel panels (80), many pixels
# (several 96-pixel chunks with a remainder), Cin > 1024 (K split inside a tap), a row longer than the
# 512-pixel gradient chunk, and asymmetric padding.
CASES = [
    (2, 8, 8, 16, 16, 3, 1, ((1, 1), (1, 1))),
    (2, 9, 7, 20, 32, 3, 1, ((1, 1), (1, 1))),
    (1, 12, 12, 32, 48, 3, 2, ((1, 1), (1, 1))),
    (1, 13, 12, 32, 48, 3, 2, ((0, 1), (0, 1))),
    (2, 5, 5, 3, 16, 3, 1, ((1, 1), (1, 1))),
    (2, 6, 6, 64, 80, 1, 1, ((0, 0), (0, 0))),
    (1, 21, 19, 96, 128, 3, 1, ((1, 1), (1, 1))),
    (1, 4, 4, 1100, 16, 3, 1, ((1, 1), (1, 1))),
    (1, 3, 600, 16, 16, 3, 1, ((1, 1), (1, 1))),
    (1, 7, 9, 16, 32, 3, 1, ((2, 0), (0, 2))),
    # panels longer than L2 (taps * Cin >= 9216) take 288-pixel chunks: 400 pixels (a full and a partial
    # chunk), a 16-channel last panel; the second case's input gradient is such a conv with the kernel
    # transposed in 16 x 16 blocks by the packing (1120 = 70 x 16 output channels)
    (1, 20, 20, 1120, 80, 3, 1, ((1, 1), (1, 1))),
    (1, 20, 20, 32, 1120, 3, 1, ((1, 1), (1, 1))),
    # 1x1 kernel gradients take the packed GEMM (DenseKernelGrad): 300 pixels (four 64-pixel blocks and a
    # remainder), 200 input channels (three input blocks, the last with a partial micro-tile), 560 output
    # channels (two panel groups, a 48-channel last panel); 1100 input channels (four runs of input blocks)
    (1, 10, 30, 200, 560, 1, 1, ((0, 0), (0, 0))),
    (2, 3, 3, 1100, 16, 1, 1, ((0, 0), (0, 0))),
    # strided input gradients as one stride-1 conv per output phase: a 1x1 stride-2 kernel (phases without
    # taps), odd sizes with stride 3 and asymmetric padding, a 4x4 stride-2 kernel, a 5x5 stride-2 "same"
    (2, 9, 11, 16, 32, 1, 2, ((0, 0), (0, 0))),
    (1, 10, 11, 16, 16, 3, 3, ((1, 1), (2, 0))),
    (1, 8, 9, 32, 16, 4, 2, ((1, 2), (1, 1))),
    (1, 11, 10, 16, 32, 5, 2, ((2, 2), (2, 2))),
]


def _ref(x, w, stride, padding):
    """float64 loop-free reference: y, and (dx, dw) for the cotangent ``ct``."""
    x64, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    f = lambda a, b: jax.lax.conv_general_dilated(a, b, stride, padding, dimension_numbers=C._DN,
                                                  precision="highest")
    with jax.enable_x64():
        y, vjp = jax.vjp(f, jnp.asarray(x64), jnp.asarray(w64))
        return y, vjp


def _operands(case, seed=0):
    b, h, w_, ci, co, k, s, pad = case
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((b, h, w_, ci)).astype(np.float32)
    w = (rng.standard_normal((k, k, ci, co)) / np.sqrt(k * k * ci)).astype(np.float32)
    return x, w, (s, s), pad


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}-k{c[5]}s{c[6]}" for c in CASES])
def test_native_conv_matches_float64_reference(case):
    x, w, stride, pad = _operands(case)
    native = jax.jit(lambda x, w: C.conv2d(x, w, stride, pad))
    y = native(x, w)
    y64, vjp64 = _ref(x, w, stride, pad)
    ct = np.random.default_rng(1).standard_normal(y.shape).astype(np.float32)
    grads = jax.jit(lambda x, w, ct: jax.vjp(lambda a, b: C.conv2d(a, b, stride, pad), x, w)[1](ct))
    dx, dw = grads(x, w, ct)
    # every part on the native kernels (strided input gradients too) unless Cin is not a multiple of 16
    assert ("convolution(" in grads.lower(x, w, ct).compile().as_text()) == (x.shape[3] % 16 != 0)
    with jax.enable_x64():
        dx64, dw64 = vjp64(jnp.asarray(ct, jnp.float64))
    xla = jax.vjp(lambda a, b: C._xla_conv(a, b, stride, pad), x, w)
    xdx, xdw = xla[1](ct)
    assert y.shape == y64.shape and dx.shape == x.shape and dw.shape == w.shape and dw.dtype == jnp.float32
    kh, kw, ci, co = w.shape
    terms = {"y": kh * kw * ci, "dx": kh * kw * co, "dw": int(np.prod(y.shape[:3]))}  # products per element
    for name, got, xla_got, want in (("y", y, xla[0], y64), ("dx", dx, xdx, dx64), ("dw", dw, xdw, dw64)):
        want = np.asarray(want)
        scale = np.abs(want).max()
        err = np.abs(np.asarray(got, np.float64) - want).max() / scale
        xla_err = np.abs(np.asarray(xla_got, np.float64) - want).max() / scale
        # float32 sums of up to 9 * 1100 products: ~1e-6 of the output scale; XLA's own error is of the
        # same size (its summation order differs). Past those 9 * 1100 terms (the long-panel cases, 400
        # outputs per channel) the kernels' one accumulator per output (summed in 1024-long blocks) drifts
        # to ~sqrt(terms) * 3e-8 of the scale (3.2e-6 at 9360, where XLA's blocked sums stay at 4e-7), so
        # only the absolute bound applies there.
        assert err < 4e-6 and (terms[name] > 9 * 1100 or err < 4 * xla_err + 1e-6), (name, err, xla_err)


def test_native_conv_finite_differences():
    x, w, stride, pad = _operands((1, 5, 6, 16, 16, 3, 1, ((1, 1), (1, 1))), seed=3)
    check_grads(lambda x, w: C.conv2d(x, w, stride, pad), (x, w), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)
    x, w, stride, pad = _operands((1, 7, 7, 16, 32, 3, 2, ((0, 1), (0, 1))), seed=4)
    check_grads(lambda x, w: C.conv2d(x, w, stride, pad), (x, w), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def _fwd_and_grads(x, w, stride, pad):
    f = jax.jit(lambda x, w: jax.value_and_grad(lambda a, b: jnp.sum(jnp.sin(C.conv2d(a, b, stride, pad))),
                                                argnums=(0, 1))(x, w))
    (v, (dx, dw)) = f(x, w)
    return np.asarray(v), np.asarray(dx), np.asarray(dw)


@pytest.mark.parametrize("case", [(2, 30, 17, 48, 96, 3, 1, ((1, 1), (1, 1))), (1, 10, 30, 200, 560, 1, 1, ((0, 0), (0, 0))),
                                  (1, 20, 20, 1120, 80, 3, 1, ((1, 1), (1, 1)))],
                         ids=["3x3", "1x1-gemm", "3x3-long-panels"])
def test_native_conv_is_independent_of_threads_and_isa(monkeypatch, case):
    """Every output element is summed in one fixed order: 1 thread, the pool's threads, AVX2 and AVX-512
    give bit-identical results."""
    x, w, stride, pad = _operands(case, seed=5)
    base = _fwd_and_grads(x, w, stride, pad)
    runs = [("TSJAX_CPU_THREADS", "1")]
    if _ffi.cpu_isa() >= 2:
        runs.append(("TSJAX_CPU_ISA", "avx2"))
    for key, value in runs:
        monkeypatch.setenv(key, value)
        other = _fwd_and_grads(x, w, stride, pad)  # the kernels read the variables at every call
        monkeypatch.delenv(key)
        for a, b in zip(base, other):
            np.testing.assert_array_equal(a, b)


def test_matmul_tn_matches_float64():
    """``matmul_tn`` (x^T dy, a dense layer's weight gradient) = the 1x1 kernel gradient: against float64
    and XLA's product, for a token count below one block, odd sizes and many blocks."""
    rng = np.random.default_rng(7)
    for t, k, n in [(5, 7, 16), (154, 768, 128), (700, 131, 272)]:
        x = rng.standard_normal((t, k)).astype(np.float32)
        dy = rng.standard_normal((t, n)).astype(np.float32)
        got = np.asarray(jax.jit(C.matmul_tn)(x, dy))
        want = x.astype(np.float64).T @ dy.astype(np.float64)
        xla = np.asarray(jnp.dot(x.T, dy))
        scale = np.abs(want).max()
        err, xla_err = np.abs(got - want).max() / scale, np.abs(xla - want).max() / scale
        assert got.shape == (k, n) and err < 2e-6 and err < 4 * xla_err + 5e-7, (t, k, n, err, xla_err)


@pytest.mark.parametrize("t,k,n", [(5, 16, 32), (97, 48, 80), (700, 320, 272), (2400, 640, 64)])
def test_matmul_nn_and_nt_match_float64(t, k, n):
    """``matmul_nn`` (x w, a dense layer's value) and ``matmul_nt`` (dy w^T, its input gradient) = a 1x1
    conv's forward / input gradient: against float64 and no further from it than XLA's product, for one
    partial micro-tile, odd row counts, several panel groups and more rows than one pixel chunk."""
    rng = np.random.default_rng(t)
    x = rng.standard_normal((t, k)).astype(np.float32)
    w = (rng.standard_normal((k, n)) / np.sqrt(k)).astype(np.float32)
    dy = rng.standard_normal((t, n)).astype(np.float32)
    for got, want, xla in ((jax.jit(C.matmul_nn)(x, w), x.astype(np.float64) @ w, jnp.dot(x, w)),
                           (jax.jit(C.matmul_nt)(dy, w), dy.astype(np.float64) @ w.T.astype(np.float64),
                            jnp.dot(dy, w.T))):
        got, xla = np.asarray(got), np.asarray(xla)
        scale = np.abs(want).max()
        err, xla_err = np.abs(got - want).max() / scale, np.abs(xla - want).max() / scale
        assert got.shape == want.shape and err < 2e-6 and err < 4 * xla_err + 5e-7, (t, k, n, err, xla_err)


def test_native_conv_under_vmap():
    x, w, stride, pad = _operands((3, 6, 6, 16, 32, 3, 1, ((1, 1), (1, 1))), seed=6)
    ws = np.stack([w, 2 * w, -w])
    xs = x[:, None]  # three single-image batches, each with its own kernel
    f = lambda a, b: C.conv2d(a, b, stride, pad)
    got = jax.jit(jax.vmap(f))(xs, ws)
    want = np.stack([np.asarray(C._xla_conv(xs[i], ws[i], stride, pad)) for i in range(3)])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda b: jnp.sum(jax.vmap(f, in_axes=(0, None))(xs, b) ** 2)))(w)
    gw = jax.grad(lambda b: jnp.sum(C._xla_conv(x, b, stride, pad) ** 2))(w)
    np.testing.assert_allclose(g, gw, rtol=1e-4, atol=1e-4 * float(np.abs(gw).max()))


@pytest.mark.parametrize("case", [(1, 12, 12, 32, 48, 3, 2, ((1, 1), (1, 1))), (2, 13, 12, 64, 32, 3, 2, ((0, 1), (0, 1)))],
                         ids=["s2-same", "s2-vae-downsample"])
def test_bf16_strided_conv_runs_float32_kernels(case):
    """bf16 operands of a strided conv: the float32 kernels on float32 copies (forward, strided input
    gradient, kernel gradient), each result rounded once to bf16: within bf16 rounding of the float32 conv
    of the same (bf16-valued) operands."""
    x, w, stride, pad = _operands(case, seed=7)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    f = jax.jit(lambda a, b: C.conv2d(a, b, stride, pad))
    grads = jax.jit(lambda a, b, c: jax.vjp(lambda a_, b_: C.conv2d(a_, b_, stride, pad), a, b)[1](c))
    y = f(xb, wb)
    ct = jnp.asarray(np.random.default_rng(2).standard_normal(y.shape), jnp.bfloat16)
    for text in (f.lower(xb, wb).compile().as_text(), grads.lower(xb, wb, ct).compile().as_text()):
        assert "tsjax_conv" in text and "convolution(" not in text  # no XLA conv, forward or backward
    dx, dw = grads(xb, wb, ct)
    x32, w32 = xb.astype(jnp.float32), wb.astype(jnp.float32)
    y32, vjp32 = jax.vjp(lambda a, b: C._xla_conv(a, b, stride, pad), x32, w32)
    dx32, dw32 = vjp32(ct.astype(jnp.float32))
    for got, want in ((y, y32), (dx, dx32), (dw, dw32)):
        assert got.dtype == jnp.bfloat16 and got.shape == want.shape
        err = np.abs(np.asarray(got, np.float32) - np.asarray(want)) / (np.abs(np.asarray(want)) + 1e-3 * np.abs(np.asarray(want)).max())
        assert err.max() < 2 ** -8, err.max()  # one bf16 rounding (2^-9 relative) plus float32 sums


def test_layers_conv_routes_to_native_kernels(monkeypatch):
    from tsjax.diffusion import layers

    def hlo(features, shape, dtype=jnp.float32, stride=1):
        m = layers.conv(features, 3, "c", dtype, stride=stride)
        x = jnp.zeros(shape, dtype)
        p = m.init(jax.random.key(0), x)
        return jax.jit(jax.grad(lambda p, x: jnp.sum(m.apply(p, x).astype(jnp.float32)), argnums=(0, 1))).lower(
            p, x).as_text()

    text = hlo(32, (1, 8, 8, 16))
    assert "tsjax_conv_forward" in text and "tsjax_conv_kernel_grad" in text
    assert "tsjax_conv_kernel_grad" in hlo(32, (1, 8, 8, 16), stride=2)  # (the sum needs no forward value)
    assert "tsjax_conv" not in hlo(4, (1, 8, 8, 16))                   # Cout not a multiple of 16
    bf16 = hlo(32, (1, 8, 8, 16), jnp.bfloat16)                        # bfloat16: AMX where the CPU has it
    assert ("tsjax_conv_forward_bf16" in bf16) == _ffi.cpu_amx_bf16()
    strided_bf16 = hlo(32, (1, 8, 8, 16), jnp.bfloat16, stride=2)  # bf16, stride 2: the float32 kernels
    assert "tsjax_conv_forward_bf16" not in strided_bf16 and "tsjax_conv_kernel_grad" in strided_bf16
    monkeypatch.setenv("TSJAX_NATIVE_CONV", "0")
    assert "tsjax_conv" not in hlo(32, (1, 8, 8, 16))


# bfloat16 on AMX tiles: odd Cin (3), Cin not a multiple of 32 (20, 48), a single 16-channel output tile
# (Cout 16 / 48), flat output positions not a multiple of 32, several images, 1x1 and asymmetric padding
AMX_CASES = [
    (2, 8, 8, 16, 16, 3, ((1, 1), (1, 1))),
    (2, 9, 7, 20, 32, 3, ((1, 1), (1, 1))),
    (1, 21, 19, 96, 48, 3, ((1, 1), (1, 1))),
    (2, 6, 6, 64, 80, 1, ((0, 0), (0, 0))),
    (2, 5, 5, 3, 16, 3, ((1, 1), (1, 1))),
    (1, 7, 9, 48, 32, 3, ((2, 0), (0, 2))),
    (3, 16, 16, 64, 64, 3, ((1, 1), (1, 1))),
]


@pytest.mark.skipif(not _ffi.cpu_amx_bf16(), reason="this CPU has no AMX-BF16 (or the OS refused its tile state)")
@pytest.mark.parametrize("case", AMX_CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}-k{c[5]}" for c in AMX_CASES])
def test_amx_bf16_conv_matches_float32_of_the_same_inputs(case):
    """bf16 operands, float32 accumulation: the output and both gradients equal the float32 conv of the
    same (bf16-rounded) inputs up to the final rounding to bf16 (XLA's own bf16 conv: the same bound)."""
    b, h, w_, ci, co, k, pad = case
    x, w, stride, _ = _operands((b, h, w_, ci, co, k, 1, pad), seed=11)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    f32 = lambda a, b_: C._xla_conv(a.astype(jnp.float32), b_.astype(jnp.float32), (1, 1), pad)
    y32, vjp32 = jax.vjp(f32, xb, wb)
    assert "tsjax_conv_forward_bf16" in jax.jit(lambda a, b_: C.conv2d(a, b_, (1, 1), pad)).lower(xb, wb).as_text()
    y, vjp = jax.vjp(jax.jit(lambda a, b_: C.conv2d(a, b_, (1, 1), pad)), xb, wb)
    ct = jnp.asarray(np.random.default_rng(12).standard_normal(y.shape), jnp.bfloat16)
    assert y.dtype == jnp.bfloat16
    got = (y,) + tuple(vjp(ct))
    want = (y32,) + tuple(vjp32(ct.astype(jnp.float32)))
    for g, ww in zip(got, want):
        assert g.dtype == jnp.bfloat16
        g, ww = np.asarray(g, np.float32), np.asarray(ww, np.float32)
        np.testing.assert_allclose(g, ww, atol=2 ** -8 * np.abs(ww).max())  # one bf16 rounding of the result


# Winograd F(m x m, 3 x 3) (C.algorithm): (B, H, W, Cin, Cout, padding). Partial tiles on both axes with a
# 48-channel panel; two images with asymmetric padding and an 80-channel output (a 16-channel last panel);
# 16 output channels (the input gradient has 160: three panels); padding 2 (the output larger than the
# input, tiles that read only padding); three images whose tiles share blocks; 1280 input channels (F(4x4)
# blocks capped at 42 tiles by the 8 MiB bound on a block's transformed input: three blocks).
WINO_CASES = [
    (1, 33, 30, 32, 48, ((1, 1), (1, 1))),
    (2, 16, 17, 64, 80, ((0, 0), (2, 1))),
    (1, 20, 20, 160, 16, ((1, 1), (1, 1))),
    (1, 9, 8, 16, 32, ((2, 2), (2, 2))),
    (3, 12, 12, 48, 64, ((1, 1), (1, 1))),
    (1, 40, 40, 1280, 16, ((1, 1), (1, 1))),
]
# Error bounds against float64, relative to the output scale: F(2x2) sums shorter products than the direct
# kernels (measured 2e-7 - 1.7e-6, the largest at 1280 input channels); F(4x4)'s transforms (points +-2,
# 1/24 in G, 8 in A^T) round 10-50x more (measured 2e-6 - 2.4e-5, the largest at 1280 and 160 input
# channels with 16 outputs).
WINO_BOUND = {"winograd2": 4e-6, "winograd4": 5e-5}


@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
@pytest.mark.parametrize("case", WINO_CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}-{c[4]}" for c in WINO_CASES])
def test_winograd_conv_matches_float64_reference(monkeypatch, algo, case):
    monkeypatch.setattr(C, "WINOGRAD_MIN_PIXELS", {2: 0, 4: 0})
    b, h, w_, ci, co, pad = case
    x, w, stride, _ = _operands((b, h, w_, ci, co, 3, 1, pad), seed=11)
    ct = np.random.default_rng(12).standard_normal(C._xla_conv(x, w, stride, pad).shape).astype(np.float32)

    def value_and_vjp(x, w, ct):
        y, vjp = jax.vjp(lambda a, b: C.conv2d(a, b, stride, pad), x, w)
        return (y, *vjp(ct))

    with C.algorithm(algo):
        f = jax.jit(value_and_vjp)
        y, dx, dw = f(x, w, ct)
        hlo = f.lower(x, w, ct).as_text()
    # forward and input gradient on the Winograd kernel with this tile size, the kernel gradient direct
    assert hlo.count("tsjax_conv_forward_winograd") == 2 and hlo.count(f"m = {algo[-1]} : i64") == 2, algo
    assert "tsjax_conv_kernel_grad" in hlo
    y64, vjp64 = _ref(x, w, stride, pad)
    with jax.enable_x64():
        dx64, dw64 = vjp64(jnp.asarray(ct, jnp.float64))
    for name, got, want, bound in (("y", y, y64, WINO_BOUND[algo]), ("dx", dx, dx64, WINO_BOUND[algo]),
                                   ("dw", dw, dw64, 4e-6)):
        want = np.asarray(want)
        err = np.abs(np.asarray(got, np.float64) - want).max() / np.abs(want).max()
        assert err < bound, (name, err)


@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
def test_winograd_is_independent_of_threads_and_isa(monkeypatch, algo):
    """The transforms do the same operations in every lane and every tile belongs to one work item: 1
    thread, the pool's threads, AVX2 and AVX-512 give bit-identical values and gradients."""
    monkeypatch.setattr(C, "WINOGRAD_MIN_PIXELS", {2: 0, 4: 0})
    x, w, stride, pad = _operands((2, 30, 17, 48, 96, 3, 1, ((1, 1), (1, 1))), seed=13)
    with C.algorithm(algo):
        base = _fwd_and_grads(x, w, stride, pad)
        runs = [("TSJAX_CPU_THREADS", "1")] + ([("TSJAX_CPU_ISA", "avx2")] if _ffi.cpu_isa() >= 2 else [])
        for key, value in runs:
            monkeypatch.setenv(key, value)
            other = _fwd_and_grads(x, w, stride, pad)
            monkeypatch.delenv(key)
            for a, b in zip(base, other):
                np.testing.assert_array_equal(a, b)


def test_winograd_routing():
    """Which convs take Winograd: 3x3 stride-1 float32 with channel multiples of 16 and enough output
    pixels (F(4x4) from 1024, F(2x2) from 512, so ``winograd4`` takes F(2x2) in between); the algorithm
    is read at trace time from the innermost ``algorithm`` block, else TSJAX_CONV_ALGORITHM."""
    f32 = jnp.float32
    tile = lambda algo, px, k=(3, 3), s=(1, 1), ci=64, co=64, dt=f32: C.winograd_tile(algo, k, s, ci, co, px, dt)  # noqa: E731
    assert [tile("winograd4", px) for px in (511, 512, 1023, 1024)] == [0, 2, 2, 4]
    assert [tile("winograd2", px) for px in (511, 512, 4096)] == [0, 2, 2]
    assert tile("direct", 4096) == 0 and tile("winograd4", 4096, k=(1, 1)) == 0
    assert tile("winograd4", 4096, s=(2, 2)) == 0 and tile("winograd4", 4096, ci=3) == 0
    assert tile("winograd4", 4096, co=40) == 0 and tile("winograd4", 4096, dt=jnp.bfloat16) == 0
    x, w, stride, pad = _operands((1, 32, 32, 16, 16, 3, 1, ((1, 1), (1, 1))))
    lowered = lambda: jax.jit(lambda x, w: C.conv2d(x, w, stride, pad)).lower(x, w).as_text()  # noqa: E731
    assert "winograd" not in lowered()
    with C.algorithm("winograd4"):
        assert C.current_algorithm() == "winograd4" and "m = 4 : i64" in lowered()
        with C.algorithm("direct"):
            assert "winograd" not in lowered()
    with pytest.raises(ValueError, match="not one of"):
        with C.algorithm("fft"):
            pass


def test_winograd_algorithm_from_environment(monkeypatch):
    monkeypatch.setenv("TSJAX_CONV_ALGORITHM", "winograd2")
    assert C.current_algorithm() == "winograd2"
    with C.algorithm("direct"):
        assert C.current_algorithm() == "direct"
    monkeypatch.setenv("TSJAX_CONV_ALGORITHM", "bogus")
    with pytest.raises(ValueError, match="not one of"):
        C.current_algorithm()
