"""Native CPU GroupNorm (+ SiLU) (tsjax.ops.group_norm): values and gradients against a float64 reference,
flax's GroupNorm and the pure-JAX path, bfloat16 data, finite differences, thread/ISA invariance, and
``tsjax.diffusion.layers.GroupNorm``."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tsjax.ops import group_norm as G

pytestmark = pytest.mark.skipif(not G.native_eligible((1, 16), jnp.float32, 1),
                                reason="native GroupNorm kernels not built or this CPU lacks AVX2+FMA")

# (B, H, W, C, groups): one chunk, several 256-pixel chunks with a remainder, 32 groups of 4 channels,
# C = 640 (more than one 128-channel register block, 20 channels a group), offset data (mean >> std).
CASES = [(2, 4, 4, 32, 8), (1, 23, 19, 64, 32), (2, 16, 16, 128, 32), (1, 5, 7, 640, 32), (2, 9, 9, 48, 16)]


def _operands(case, seed=0, offset=0.0):
    b, h, w, c, _ = case
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal((b, h, w, c)) * 1.5 + offset).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(c)).astype(np.float32)
    ct = rng.standard_normal((b, h, w, c)).astype(np.float32)
    return x, scale, bias, ct


def _rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / max(np.abs(b).max(), 1e-30))


@pytest.mark.parametrize("silu", [False, True])
@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}g{c[4]}" for c in CASES])
def test_native_group_norm_matches_float64_reference(case, silu):
    g = case[-1]
    x, scale, bias, ct = _operands(case, offset=3.0 if case[3] == 48 else 0.0)
    f = lambda x, s, b: G.group_norm(x, s, b, groups=g, eps=1e-5, silu=silu)
    y, vjp = jax.vjp(jax.jit(f), x, scale, bias)
    grads = vjp(ct)
    with jax.enable_x64():
        ref = lambda x, s, b: G._reference(x.reshape(x.shape[0], -1, x.shape[-1]), s, b, g, 1e-5, silu).reshape(x.shape)
        y64, vjp64 = jax.vjp(ref, *(jnp.asarray(a, jnp.float64) for a in (x, scale, bias)))
        g64 = vjp64(jnp.asarray(ct, jnp.float64))
    assert "tsjax_group_norm_forward" in jax.jit(f).lower(x, scale, bias).as_text()
    # float32 statistics / products: a few ulp of the output scale; dscale / dbias sum up to 2 * 23 * 19
    # products (chunked float32 partials combined in double)
    for got, want in [(y, y64)] + list(zip(grads, g64)):
        assert got.dtype == jnp.float32 and _rel(got, want) < 2e-6, _rel(got, want)
    # flax's GroupNorm (+ jax.nn.silu) on the same data: the semantics being replaced
    m = nn.GroupNorm(num_groups=g, epsilon=1e-5, use_fast_variance=False)
    yf = m.apply({"params": {"scale": scale, "bias": bias}}, x)
    yf = jax.nn.silu(yf) if silu else yf
    assert _rel(y, yf) < 2e-6


def test_native_group_norm_bfloat16():
    """bf16 data, float32 statistics: within one bf16 rounding of the float32 computation on the same
    (bf16-rounded) input, and the same for the input gradient."""
    x, scale, bias, ct = _operands((2, 16, 16, 64, 32), seed=2)
    xb, ctb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(ct, jnp.bfloat16)
    f = lambda x, s, b: G.group_norm(x, s, b, groups=32, eps=1e-6, silu=True)
    y, vjp = jax.vjp(jax.jit(f), xb, scale, bias)
    dx, ds, db = vjp(ctb)
    y32, vjp32 = jax.vjp(f, xb.astype(jnp.float32), scale, bias)
    dx32, ds32, db32 = vjp32(ctb.astype(jnp.float32))
    assert y.dtype == dx.dtype == jnp.bfloat16 and ds.dtype == jnp.float32
    for got, want in ((y, y32), (dx, dx32)):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2 ** -7 * float(np.abs(want).max()))
    for got, want in ((ds, ds32), (db, db32)):
        assert _rel(got, want) < 1e-2


def test_native_group_norm_finite_differences():
    x, scale, bias, _ = _operands((1, 3, 5, 16, 4), seed=3)
    check_grads(lambda x, s, b: G.group_norm(x, s, b, groups=4, eps=1e-5, silu=True), (x, scale, bias), order=1,
                modes=("rev",), atol=2e-2, rtol=2e-2)


def test_native_group_norm_is_independent_of_threads_and_isa(check_thread_isa_invariance):
    x, scale, bias, ct = _operands((2, 31, 17, 64, 32), seed=4)
    f = jax.jit(lambda x, s, b: jax.vjp(lambda *a: G.group_norm(*a, groups=32, eps=1e-5, silu=True), x, s, b))

    def run():
        y, vjp = f(x, scale, bias)
        return [y, *vjp(ct)]

    check_thread_isa_invariance(run)


def test_layers_group_norm_module(monkeypatch):
    """``layers.GroupNorm`` keeps ``nn.GroupNorm``'s parameter names and values (float32 ``scale`` ones,
    ``bias`` zeros) and routes to the native kernels only where they apply."""
    from tsjax.diffusion import layers

    x = jnp.asarray(np.random.default_rng(5).standard_normal((2, 6, 6, 32)), jnp.float32)
    m = layers.group_norm(8, 1e-6, "n", jnp.bfloat16, silu=True)
    p = m.init(jax.random.key(0), x)
    assert jax.tree.map(lambda a: (a.shape, a.dtype), p["params"]) == {
        "scale": ((32,), jnp.float32), "bias": ((32,), jnp.float32)}
    y = m.apply(p, x)
    ref = jax.nn.silu(nn.GroupNorm(num_groups=8, epsilon=1e-6, use_fast_variance=False).apply(p, x))
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=1e-2)
    assert "tsjax_group_norm_forward" in jax.jit(m.apply).lower(p, x).as_text()
    odd = jnp.zeros((1, 4, 4, 12))  # 12 channels: not a multiple of the vector width
    assert "tsjax_group_norm" not in jax.jit(layers.group_norm(4, 1e-6, "n", jnp.float32).init).lower(
        jax.random.key(0), odd).as_text()
    monkeypatch.setenv("TSJAX_NATIVE_GROUP_NORM", "0")
    assert "tsjax_group_norm" not in jax.jit(m.apply).lower(p, x).as_text()
