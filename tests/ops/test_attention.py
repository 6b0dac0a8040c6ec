"""Native CPU flash attention (tsjax.ops.attention): values and gradients against a float64 reference and
XLA, finite differences, both instruction sets, thread-count invariance, vmap, and the routing of
``tsjax.diffusion.layers.attention``."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from tsjax.ops import _ffi
from tsjax.ops import attention as A

pytestmark = pytest.mark.skipif(not A.native_available(),
                                reason="native attention kernels not built or this CPU lacks AVX2+FMA")

# (B, N, M, H, D): one block, partial query and key blocks (100 / 77: the text context), fewer keys than
# one vector (5), D = 32 / 64, and the mid UNet's level-0 self-attention (16 x 16 blocks).
CASES = [(2, 64, 64, 2, 16), (1, 100, 77, 3, 16), (2, 130, 5, 2, 32), (1, 33, 200, 1, 64), (2, 1024, 1024, 8, 16)]


def _operands(case, seed=0):
    b, n, m, h, d = case
    rng = np.random.default_rng(seed)
    q = (2 * rng.standard_normal((b, n, h, d))).astype(np.float32)  # logits of order 4-8: a peaked softmax
    k = (2 * rng.standard_normal((b, m, h, d))).astype(np.float32)
    v = rng.standard_normal((b, m, h, d)).astype(np.float32)
    ct = rng.standard_normal((b, n, h, d)).astype(np.float32)
    return q, k, v, ct


def _rel(a, b):
    b = np.asarray(b, np.float64)
    return float(np.abs(np.asarray(a, np.float64) - b).max() / np.abs(b).max())


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}x{c[1]}x{c[2]}x{c[3]}x{c[4]}" for c in CASES])
def test_native_attention_matches_float64_reference(case):
    q, k, v, ct = _operands(case)
    with jax.enable_x64():
        f64 = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, scale=1 / np.sqrt(q.shape[-1]))
        y64, vjp = jax.vjp(f64, *(jnp.asarray(a, jnp.float64) for a in (q, k, v)))
        g64 = [np.asarray(g) for g in vjp(jnp.asarray(ct, jnp.float64))]
    y = jax.jit(A.flash_attention)(q, k, v)
    g = jax.jit(lambda q, k, v: jax.vjp(A.flash_attention, q, k, v)[1](ct))(q, k, v)
    yx = A._xla_attention(q, k, v)
    gx = jax.vjp(A._xla_attention, q, k, v)[1](ct)
    assert y.shape == q.shape and y.dtype == jnp.float32
    # float32 with a polynomial exp: within 4e-6 of the output / gradient scale, and within a few times
    # XLA's own float32 error (measured 0.6-1.8e-6 vs XLA's 0.2-1.5e-6)
    for got, xla, want in [(y, yx, y64)] + list(zip(g, gx, g64)):
        err, xla_err = _rel(got, want), _rel(xla, want)
        assert err < 4e-6 and err < 5 * xla_err + 5e-7, (err, xla_err)


def test_native_attention_finite_differences():
    q, k, v, _ = _operands((1, 20, 70, 2, 16), seed=3)
    check_grads(A.flash_attention, (q / 2, k / 2, v), order=1, modes=("rev",), atol=2e-2, rtol=2e-2)


def _value_and_grads(q, k, v, ct):
    f = jax.jit(lambda q, k, v: jax.vjp(A.flash_attention, q, k, v))
    y, vjp = f(q, k, v)
    return [np.asarray(y)] + [np.asarray(g) for g in vjp(ct)]


def test_native_attention_is_independent_of_threads(monkeypatch):
    """One (batch, head) pair per work item: 1 thread and the pool's threads give bit-identical results;
    the AVX2 path (where AVX-512 is the default) agrees to float32 round-off."""
    q, k, v, ct = _operands((2, 150, 90, 3, 16), seed=5)
    base = _value_and_grads(q, k, v, ct)
    monkeypatch.setenv("TSJAX_CPU_THREADS", "1")
    for a, b in zip(base, _value_and_grads(q, k, v, ct)):
        np.testing.assert_array_equal(a, b)
    monkeypatch.delenv("TSJAX_CPU_THREADS")
    if _ffi.cpu_isa() >= 2:
        monkeypatch.setenv("TSJAX_CPU_ISA", "avx2")
        for a, b in zip(base, _value_and_grads(q, k, v, ct)):
            assert _rel(a, b) < 2e-6


def test_native_attention_under_vmap():
    q, k, v, ct = _operands((2, 40, 30, 2, 16), seed=6)
    qs, ks, vs = q[:, None], k[:, None], np.stack([v[:, None][0], -v[:, None][1]])
    got = jax.jit(jax.vmap(A.flash_attention))(qs, ks, vs)
    want = np.stack([np.asarray(A._xla_attention(qs[i], ks[i], vs[i])) for i in range(2)])
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_bfloat16_inputs_are_computed_in_float32():
    q, k, v, _ = _operands((1, 64, 64, 2, 16), seed=7)
    qb, kb, vb = (jnp.asarray(a, jnp.bfloat16) for a in (q, k, v))
    y = A.flash_attention(qb, kb, vb)
    assert y.dtype == jnp.bfloat16
    want = A._xla_attention(*(a.astype(jnp.float32) for a in (qb, kb, vb)))
    np.testing.assert_allclose(np.asarray(y, np.float32), want, atol=1e-2 * float(np.abs(want).max()))


def test_layers_attention_routes_to_native_kernels(monkeypatch):
    from tsjax.diffusion import layers

    q = jnp.zeros((1, 300, 2, 16))
    k = jnp.zeros((1, 77, 2, 16))

    def hlo(q, k, **kw):
        return jax.jit(lambda q, k: layers.attention(q, k, k, **kw)).lower(q, k).as_text()

    assert "tsjax_attention_forward" in hlo(q, k)                     # auto on CPU: native
    assert "tsjax_attention_forward" not in hlo(q, k, impl="chunked")  # an explicit choice is kept
    assert "tsjax_attention_forward" not in hlo(q, q, is_causal=True)  # causal: XLA
    odd = jnp.zeros((1, 300, 2, 20))                                   # head size 20: not a vector multiple
    assert "tsjax_attention_forward" not in hlo(odd, odd)
    monkeypatch.setenv("TSJAX_NATIVE_ATTENTION", "0")
    assert "tsjax_attention_forward" not in hlo(q, k)
