"""Chunked (flash-style, query-blocked) CPU attention: forward and custom VJP against the full softmax."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.diffusion.layers import _query_block, attention


def _qkv(n, m, seed=0, h=2, d=8):
    ks = jax.random.split(jax.random.key(seed), 4)
    q, k, v = (jax.random.normal(kk, (2, s, h, d), jnp.float32) for kk, s in zip(ks, (n, m, m)))
    return q, k, v, jax.random.normal(ks[3], (2, n, h, d), jnp.float32)


@pytest.mark.parametrize("n,m", [(384, 77), (320, 320), (36, 5)])
def test_chunked_attention_matches_full_softmax_value_and_grads(n, m):
    q, k, v, w = _qkv(n, m)

    def loss(impl):
        return lambda q, k, v: jnp.sum(attention(q, k, v, impl=impl) * w)

    np.testing.assert_allclose(attention(q, k, v, impl="chunked"), attention(q, k, v, impl="einsum"), atol=1e-6)
    g_ref = jax.grad(loss("einsum"), argnums=(0, 1, 2))(q, k, v)
    g_chk = jax.jit(jax.grad(loss("chunked"), argnums=(0, 1, 2)))(q, k, v)
    for a, b in zip(g_chk, g_ref):
        scale = float(jnp.max(jnp.abs(b)))
        assert scale > 1e-2  # non-trivial gradients
        # dk/dv accumulate over N/16 query blocks in float32: 1e-6 of the gradient's scale (and >= 2e-6)
        np.testing.assert_allclose(a, b, atol=max(2e-6, 1e-6 * scale))


def test_chunked_attention_blocks_dtype_and_auto_routing():
    assert (_query_block(1024), _query_block(320), _query_block(36), _query_block(7)) == (16, 16, 36, 7)
    assert _query_block(320, target=128) == 64
    q, k, v, _ = _qkv(384, 77)
    out = attention(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), v.astype(jnp.bfloat16), impl="chunked")
    assert out.dtype == jnp.bfloat16
    # auto on CPU picks the chunked path for > 256 queries: same values as calling it explicitly
    np.testing.assert_array_equal(attention(q, k, v), attention(q, k, v, impl="chunked"))
    with pytest.raises(ValueError, match="no causal mask"):
        attention(q, k, v, impl="chunked", is_causal=True)
