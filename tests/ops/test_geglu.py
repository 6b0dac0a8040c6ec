"""Native CPU GEGLU (tsjax.ops.geglu): values and gradients against a float64 reference (math.erf) and the
pure-JAX path, bfloat16 data, finite differences, thread/ISA invariance, the fallbacks, and the
transformer block's feed-forward in ``tsjax.diffusion.layers``."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tsjax.ops import geglu as G

pytestmark = pytest.mark.skipif(not G.native_eligible((1, 32), jnp.float32),
                                reason="native GEGLU kernels not built or this CPU lacks AVX2+FMA")

# (leading shape, F): one row, rows spanning several work items (16384 outputs an item), F = 16 and 640.
CASES = [((1,), 16), ((2, 37), 128), ((3, 50), 640), ((70, 260), 64)]


def _operands(lead, f, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((*lead, 2 * f)) * scale).astype(np.float32)
    ct = rng.standard_normal((*lead, f)).astype(np.float32)
    bias = (0.5 * rng.standard_normal(2 * f)).astype(np.float32)
    return x, ct, bias


def _float64(x, ct, bias=0.0):
    """Forward and input gradient in float64 (math.erf): gelu(g) = g Phi(g), gelu'(g) = Phi(g) + g phi(g)."""
    x = np.asarray(x, np.float64) + np.asarray(bias, np.float64)
    h, g = np.split(x, 2, axis=-1)
    phi_cdf = 0.5 * (1 + np.vectorize(math.erf)(g / math.sqrt(2)))
    pdf = np.exp(-0.5 * g * g) / math.sqrt(2 * math.pi)
    y = h * g * phi_cdf
    dx = np.concatenate([ct * g * phi_cdf, ct * h * (phi_cdf + g * pdf)], axis=-1)
    return y, dx


@pytest.mark.parametrize("case", CASES, ids=[f"{'x'.join(map(str, c[0]))}-F{c[1]}" for c in CASES])
def test_native_geglu_matches_float64_reference(case):
    x, ct, bias = _operands(*case)
    y, vjp = jax.vjp(jax.jit(G.geglu), x, bias)
    dx, db = vjp(ct)
    y64, dx64 = _float64(x, ct, bias)
    db64 = dx64.reshape(-1, dx64.shape[-1]).sum(0)
    assert "tsjax_geglu_forward" in jax.jit(G.geglu).lower(x, bias).as_text()
    assert y.shape == y64.shape and dx.shape == x.shape and y.dtype == dx.dtype == db.dtype == jnp.float32
    # erf to < 4e-7 absolute, a few float32 roundings: errors of ~1e-6 of |h g|, |g| up to ~9
    np.testing.assert_allclose(y, y64, rtol=2e-6, atol=2e-6 * np.abs(y64).max())
    np.testing.assert_allclose(dx, dx64, rtol=2e-6, atol=2e-6 * np.abs(dx64).max())
    # the bias gradient sums up to 2 * 37 rows (float32 per block of rows, blocks in double)
    np.testing.assert_allclose(db, db64, rtol=1e-5, atol=4e-6 * np.abs(dx64).max())
    # and the jax.nn.gelu(approximate=False) path it replaces
    yr, vjpr = jax.vjp(G._reference, x, bias)
    dxr, dbr = vjpr(ct)
    np.testing.assert_allclose(y, yr, rtol=1e-5, atol=1e-5 * np.abs(y64).max())
    np.testing.assert_allclose(dx, dxr, rtol=1e-5, atol=1e-5 * np.abs(dx64).max())
    np.testing.assert_allclose(db, dbr, rtol=1e-5, atol=1e-5 * np.abs(dx64).max())


def test_native_geglu_tails_and_extremes():
    """Gates far in both tails (erf clamped: gelu(g) = g or 0, gelu'(g) = 1 or 0) and exact zeros."""
    g = np.array([-40.0, -12.0, -6.0, -3.9, -1e-3, 0.0, 1e-3, 3.9, 6.0, 12.0, 40.0, 0.5, -0.5, 2.0, -2.0, 1.0],
                 np.float32)
    x = np.concatenate([np.linspace(-2, 2, 16, dtype=np.float32), g])[None]  # no bias
    ct = np.ones((1, 16), np.float32)
    y, vjp = jax.vjp(G.geglu, x)
    y64, dx64 = _float64(x, ct)
    np.testing.assert_allclose(y, y64, rtol=2e-6, atol=1e-6)
    np.testing.assert_allclose(vjp(ct)[0], dx64, rtol=2e-6, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(y)))


def test_native_geglu_bfloat16():
    """bf16 data, float32 arithmetic: within one bf16 rounding of the float32 kernel on the same input."""
    x, ct, _ = _operands((4, 33), 96, seed=2)
    xb, ctb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(ct, jnp.bfloat16)
    y, vjp = jax.vjp(jax.jit(G.geglu), xb)
    (dx,) = vjp(ctb)
    y32, vjp32 = jax.vjp(G.geglu, xb.astype(jnp.float32))
    (dx32,) = vjp32(ctb.astype(jnp.float32))
    assert y.dtype == dx.dtype == jnp.bfloat16
    assert "tsjax_geglu_backward" in jax.jit(lambda a: jax.vjp(G.geglu, a)[1](ctb)).lower(xb).as_text()
    for got, want in ((y, y32), (dx, dx32)):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=1e-6)


def test_native_geglu_finite_differences():
    x, _, bias = _operands((3,), 16, seed=3, scale=1.0)
    check_grads(G.geglu, (x, bias), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def test_native_geglu_is_independent_of_threads_and_isa(check_thread_isa_invariance):
    x, ct, bias = _operands((2, 300), 128, seed=4)  # 5 blocks of 128 rows
    f = jax.jit(lambda x, b: jax.vjp(G.geglu, x, b))

    def run():
        y, vjp = f(x, bias)
        return [y, *vjp(ct)]

    check_thread_isa_invariance(run)


def test_native_geglu_under_vmap():
    """vmap over a leading axis with a per-element bias (the multi-asset step vmaps the UNet): the native
    calls run per element and agree with the unbatched calls, in value and gradient."""
    x, ct, bias = _operands((3, 5), 32, seed=7)
    biases = np.stack([bias, -bias, 2 * bias])

    def f(x, b):
        y, vjp = jax.vjp(G.geglu, x, b)
        return y, vjp(ct[0])

    y, (dx, db) = jax.jit(jax.vmap(f))(x, biases)
    for i in range(3):
        yi, (dxi, dbi) = f(x[i], biases[i])
        np.testing.assert_allclose(y[i], yi, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(dx[i], dxi, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(db[i], dbi, rtol=1e-6, atol=1e-6)


def test_geglu_fallbacks(monkeypatch):
    """F not a multiple of the vector width, float16, and TSJAX_NATIVE_GEGLU=0 take the jax.numpy path
    (same values)."""
    x, _, bias = _operands((5,), 12, seed=5)
    assert not G.native_eligible(x.shape, jnp.float32)
    assert "tsjax_geglu" not in jax.jit(G.geglu).lower(x, bias).as_text()
    np.testing.assert_array_equal(G.geglu(x, bias), G._reference(x, bias))
    assert not G.native_eligible((4, 64), jnp.float16)
    with pytest.raises(ValueError, match=r"bias must have shape \(24,\)"):
        G.geglu(x, bias[:4])
    x, _, _ = _operands((5,), 32, seed=5)
    monkeypatch.setenv("TSJAX_NATIVE_GEGLU", "0")
    assert "tsjax_geglu" not in jax.jit(G.geglu).lower(x).as_text()


def test_feed_forward_uses_native_geglu(monkeypatch):
    """``layers.FeedForward`` keeps its parameters and, native or not, computes diffusers' GEGLU."""
    from tsjax.diffusion import layers

    x = jnp.asarray(np.random.default_rng(6).standard_normal((2, 7, 32)), jnp.float32)
    m = layers.FeedForward(mult=4)
    p = m.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: a.shape, p["params"]) == {
        "net_0": {"proj": {"kernel": (32, 256), "bias": (256,)}}, "net_2": {"kernel": (128, 32), "bias": (32,)}}
    def loss():  # a new function each time: the switch is read when it is traced
        return lambda p, x: jnp.sum(m.apply(p, x) ** 2)

    assert "tsjax_geglu_forward" in jax.jit(loss()).lower(p, x).as_text()
    v, g = jax.value_and_grad(loss(), argnums=(0, 1))(p, x)
    monkeypatch.setenv("TSJAX_NATIVE_GEGLU", "0")
    assert "tsjax_geglu" not in jax.jit(loss()).lower(p, x).as_text()
    v0, g0 = jax.value_and_grad(loss(), argnums=(0, 1))(p, x)
    np.testing.assert_allclose(v, v0, rtol=1e-5)
    for a, b in zip(jax.tree.leaves(g), jax.tree.leaves(g0)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(np.abs(b).max()))
