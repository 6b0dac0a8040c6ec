"""Native CPU LayerNorm (tsjax.ops.layer_norm): values and gradients against a float64 numpy reference, flax's
LayerNorm and the pure-JAX path, bfloat16 data, thread/ISA invariance, vmap, the fallback for channel counts
the kernels do not take, and that the native path is the one compiled."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.ops import layer_norm as L

pytestmark = pytest.mark.skipif(not L.native_eligible((1, 16), jnp.float32),
                                reason="native LayerNorm kernels not built / registered or this CPU lacks AVX2+FMA")

EPS = 1e-5
# (x shape, offset): one row block of 4 with a remainder, several 64-row chunks with a remainder, leading
# dims flattened into rows, C = 768 (48 AVX-512 vectors), offset data (mean >> std: two-pass variance).
CASES = [((37, 16), 0.0), ((300, 128), 3.0), ((2, 3, 41, 128), 0.0), ((154, 768), 3.0), ((130, 256), -2.0)]
IDS = ["x".join(map(str, s)) + f"{o:+g}" for s, o in CASES]


def _operands(shape, seed=0, offset=0.0):
    c = shape[-1]
    rng = np.random.default_rng(seed)
    x = (rng.standard_normal(shape) * 1.5 + offset).astype(np.float32)
    scale = (1 + 0.3 * rng.standard_normal(c)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(c)).astype(np.float32)
    w = rng.standard_normal(shape).astype(np.float32)  # loss weights = the cotangent of y
    return x, scale, bias, w


def _numpy_reference(x, scale, bias, w):
    """float64: y and the gradients of sum(y * w) in x, scale and bias."""
    x, scale, bias, w = (np.asarray(a, np.float64) for a in (x, scale, bias, w))
    c = x.shape[-1]
    x2, w2 = x.reshape(-1, c), w.reshape(-1, c)
    mean = x2.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(((x2 - mean) ** 2).mean(-1, keepdims=True) + EPS)
    xhat = (x2 - mean) * rstd
    y = xhat * scale + bias
    g = w2 * scale
    dx = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return y.reshape(x.shape), dx.reshape(x.shape), (w2 * xhat).sum(0), w2.sum(0)


def _loss(fn):
    return lambda x, s, b, w: jnp.sum(fn(x, s, b).astype(jnp.float32) * w)


_native_ln = lambda x, s, b: L.layer_norm(x, s, b, eps=EPS)  # noqa: E731
_ref_ln = lambda x, s, b: L._reference(x, s, b, EPS)  # noqa: E731


def _max_err(a, b):
    return float(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)).max())


def _rel(a, b):
    return _max_err(a, b) / max(float(np.abs(np.asarray(b, np.float64)).max()), 1e-30)


@pytest.mark.parametrize("shape,offset", CASES, ids=IDS)
def test_native_layer_norm_forward(shape, offset):
    x, scale, bias, _ = _operands(shape, offset=offset)
    f = jax.jit(_native_ln)
    assert "tsjax_layer_norm_forward" in f.lower(x, scale, bias).as_text()
    y = f(x, scale, bias)
    assert y.shape == x.shape and y.dtype == jnp.float32
    y64 = _numpy_reference(x, scale, bias, x)[0]
    # float32 statistics of O(1) (and offset) data, |y| <~ 7: measured <= 1e-6
    assert _max_err(y, y64) < 3e-6, _max_err(y, y64)
    # flax's LayerNorm and the jax.numpy path on the same data (their own float32 error is the larger)
    yf = nn.LayerNorm(epsilon=EPS, use_fast_variance=False).apply({"params": {"scale": scale, "bias": bias}}, x)
    assert _rel(y, yf) < 1e-6, _rel(y, yf)
    assert _rel(y, _ref_ln(x, scale, bias)) < 1e-6


@pytest.mark.parametrize("shape,offset", CASES, ids=IDS)
def test_native_layer_norm_backward(shape, offset):
    x, scale, bias, w = _operands(shape, seed=1, offset=offset)
    grad = jax.jit(jax.grad(_loss(_native_ln), argnums=(0, 1, 2)))
    assert "tsjax_layer_norm_backward" in grad.lower(x, scale, bias, w).as_text()
    dx, ds, db = grad(x, scale, bias, w)
    _, dx64, ds64, db64 = _numpy_reference(x, scale, bias, w)
    # dscale / dbias sum up to 300 rows (per 64-row chunk in float32, the chunks in double)
    for got, want in ((dx, dx64), (ds, ds64), (db, db64)):
        assert got.dtype == jnp.float32 and _rel(got, want) < 2e-6, _rel(got, want)
    # and jax.grad of the jax.numpy reference in float32
    for got, want in zip((dx, ds, db), jax.grad(_loss(_ref_ln), argnums=(0, 1, 2))(x, scale, bias, w)):
        assert _rel(got, want) < 1e-5, _rel(got, want)


def test_native_layer_norm_bfloat16():
    """bf16 data, float32 statistics: within one bf16 rounding of the float32 computation on the same
    (bf16-rounded) input, and the same for the input gradient; dscale / dbias float32."""
    x, scale, bias, w = _operands((3, 70, 128), seed=2, offset=1.0)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
    f = jax.jit(lambda x, s, b: jax.vjp(_native_ln, x, s, b))
    assert "tsjax_layer_norm_forward" in f.lower(xb, scale, bias).as_text()
    y, vjp = f(xb, scale, bias)
    dx, ds, db = vjp(wb)
    y32, vjp32 = jax.vjp(_ref_ln, xb.astype(jnp.float32), scale, bias)
    dx32, ds32, db32 = vjp32(wb.astype(jnp.float32))
    assert y.dtype == dx.dtype == jnp.bfloat16 and ds.dtype == db.dtype == jnp.float32
    for got, want in ((y, y32), (dx, dx32)):
        np.testing.assert_allclose(np.asarray(got, np.float32), want, atol=2 ** -7 * float(np.abs(want).max()))
    for got, want in ((ds, ds32), (db, db32)):
        assert _rel(got, want) < 1e-5, _rel(got, want)
    # the jax.numpy path on the same bf16 data: the same up to bf16 rounding of y
    np.testing.assert_allclose(np.asarray(y, np.float32), np.asarray(_ref_ln(xb, scale, bias), np.float32),
                               atol=2 ** -7 * float(np.abs(y32).max()))


def test_native_layer_norm_is_independent_of_threads_and_isa(check_thread_isa_invariance):
    x, scale, bias, w = _operands((2, 333, 128), seed=4, offset=0.5)  # 11 chunks of 64 rows
    f = jax.jit(lambda x, s, b: jax.vjp(_native_ln, x, s, b))

    def run(dtype=jnp.float32):
        y, vjp = f(jnp.asarray(x, dtype), scale, bias)
        return [np.asarray(y, np.float32)] + [np.asarray(a, np.float32) for a in vjp(jnp.asarray(w, dtype))]

    check_thread_isa_invariance(run)
    check_thread_isa_invariance(lambda: run(jnp.bfloat16), isa_rel=1e-2)


def test_native_layer_norm_vmap():
    """Under vmap (batched x and parameters, or batched x only) the native calls take the mapped axis as
    more rows with per-batch parameters: values and gradients as the reference per batch element."""
    x, _, _, w = _operands((3, 20, 32), seed=5, offset=1.0)
    rng = np.random.default_rng(6)
    scale = (1 + 0.3 * rng.standard_normal((3, 32))).astype(np.float32)
    bias = (0.2 * rng.standard_normal((3, 32))).astype(np.float32)
    fv = jax.jit(jax.vmap(_native_ln))
    text = fv.lower(x, scale, bias).as_text()
    assert "tsjax_layer_norm_forward" in text and "while" not in text
    np.testing.assert_allclose(fv(x, scale, bias), jax.vmap(_ref_ln)(x, scale, bias), atol=2e-6)
    np.testing.assert_allclose(jax.vmap(_native_ln, (0, None, None))(x, scale[0], bias[0]),
                               _ref_ln(x, scale[0], bias[0]), atol=2e-6)
    # per-example gradients (vmap of grad) and the gradient of a vmapped loss (shared parameters)
    gv = jax.jit(jax.vmap(jax.grad(_loss(_native_ln), argnums=(0, 1, 2))))(x, scale, bias, w)
    gr = jax.vmap(jax.grad(_loss(_ref_ln), argnums=(0, 1, 2)))(x, scale, bias, w)
    for got, want in zip(gv, gr):
        assert got.shape == want.shape and _rel(got, want) < 1e-5, _rel(got, want)
    loss_v = lambda f: lambda x, s, b: jnp.sum(jax.vmap(f, (0, None, None))(x, s, b) * w)  # noqa: E731
    gv = jax.jit(jax.grad(loss_v(_native_ln), argnums=(0, 1, 2)))(x, scale[1], bias[1])
    gr = jax.grad(loss_v(_ref_ln), argnums=(0, 1, 2))(x, scale[1], bias[1])
    for got, want in zip(gv, gr):
        assert got.shape == want.shape and _rel(got, want) < 1e-5, _rel(got, want)


def test_layer_norm_fallback_and_switch(monkeypatch):
    """Channel counts that are not a multiple of the vector width, and TSJAX_NATIVE_LAYER_NORM=0, take the
    jax.numpy path (the same values); rank-1 input takes the native path."""
    x, scale, bias, w = _operands((50, 20), seed=7, offset=2.0)
    assert not L.native_eligible(x.shape, x.dtype)
    f = jax.jit(_native_ln)
    assert "tsjax_layer_norm" not in f.lower(x, scale, bias).as_text()
    np.testing.assert_array_equal(f(x, scale, bias), jax.jit(_ref_ln)(x, scale, bias))
    np.testing.assert_allclose(f(x, scale, bias), _numpy_reference(x, scale, bias, w)[0], atol=1e-5)
    dx, ds, db = jax.grad(_loss(_native_ln), argnums=(0, 1, 2))(x, scale, bias, w)
    _, dx64, ds64, db64 = _numpy_reference(x, scale, bias, w)
    for got, want in ((dx, dx64), (ds, ds64), (db, db64)):
        assert _rel(got, want) < 1e-5
    assert not L.native_eligible((4, 16), jnp.float16) and not L.native_eligible((0, 16), jnp.float32)

    x, scale, bias, _ = _operands((64,), seed=8)
    assert "tsjax_layer_norm_forward" in jax.jit(_native_ln).lower(x, scale, bias).as_text()
    np.testing.assert_allclose(_native_ln(x, scale, bias), _ref_ln(x, scale, bias), atol=2e-6)

    monkeypatch.setenv("TSJAX_NATIVE_LAYER_NORM", "0")
    assert not L.native_eligible((4, 16), jnp.float32)
    assert "tsjax_layer_norm" not in jax.jit(lambda *a: _native_ln(*a)).lower(x, scale, bias).as_text()  # traced anew
