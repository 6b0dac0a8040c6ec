"""Hash-grid encoding: shapes, exact trilinear interpolation, level masking, gradients, progressive band."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.geometry.hashgrid import HashGridConfig, encode, init_hashgrid, level_resolutions, progressive_mask

CFG = HashGridConfig(n_levels=4, n_features=2, log2_table_size=14, base_resolution=8, per_level_scale=1.5)


def test_defaults_and_shapes():
    d = HashGridConfig()
    assert (d.n_levels, d.n_features, d.log2_table_size, d.base_resolution) == (10, 2, 19, 32)
    assert level_resolutions(d) == [32, 42, 55, 73, 97, 127, 168, 222, 294, 388]
    t = init_hashgrid(jax.random.key(0), CFG)
    assert t.shape == (4, 2 ** 14, 2) and float(jnp.abs(t).max()) <= CFG.init_scale
    x = jax.random.uniform(jax.random.key(1), (100, 3))
    assert encode(t, x, CFG).shape == (100, 8)
    with pytest.raises(ValueError, match="HashGridConfig"):
        HashGridConfig(log2_table_size=40)


def test_trilinear_reproduces_linear_functions_on_dense_levels():
    """Table = a linear function of the lattice coordinates -> the encoding is that function anywhere."""
    cfg = HashGridConfig(n_levels=2, n_features=2, log2_table_size=14, base_resolution=8, per_level_scale=2.0)
    tables = np.zeros((2, 2 ** 14, 2), np.float32)
    for lvl, res in enumerate(level_resolutions(cfg)):
        assert (res + 1) ** 3 <= 2 ** 14  # dense levels
        i, j, k = np.meshgrid(*[np.arange(res + 1)] * 3, indexing="ij")
        rows = ((i * (res + 1) + j) * (res + 1) + k).reshape(-1)
        tables[lvl, rows, 0] = (2 * i - j + 0.5 * k).reshape(-1) / res
        tables[lvl, rows, 1] = 1.0
    x = np.random.default_rng(0).uniform(0, 1, (500, 3)).astype(np.float32)
    out = np.asarray(encode(jnp.asarray(tables), x, cfg))
    lin = 2 * x[:, 0] - x[:, 1] + 0.5 * x[:, 2]
    np.testing.assert_allclose(out[:, 0], lin, atol=1e-5)
    np.testing.assert_allclose(out[:, 2], lin, atol=1e-5)
    np.testing.assert_allclose(out[:, [1, 3]], 1.0, atol=1e-5)  # weights sum to 1


def test_level_mask_zeroes_inactive_levels():
    t = jax.random.normal(jax.random.key(0), (4, 2 ** 14, 2))
    x = jax.random.uniform(jax.random.key(1), (50, 3))
    full = encode(t, x, CFG)
    m = encode(t, x, CFG, jnp.array([1.0, 1.0, 0.0, 0.0]))
    np.testing.assert_allclose(m[:, :4], full[:, :4], rtol=1e-6)
    assert float(jnp.abs(m[:, 4:]).max()) == 0.0 and float(jnp.abs(full[:, 4:]).max()) > 0


def test_gradients():
    t = jax.random.normal(jax.random.key(0), (4, 2 ** 14, 2))
    x = jax.random.uniform(jax.random.key(1), (64, 3), minval=0.05, maxval=0.95)
    # d(sum of features)/d(table) sums to N per level and feature (trilinear weights sum to 1)
    gt = jax.grad(lambda tt: jnp.sum(encode(tt, x, CFG)))(t)
    np.testing.assert_allclose(np.asarray(gt).sum(axis=1), 64.0, rtol=1e-5)
    # gradient w.r.t. positions matches central differences; points stay >= 0.2 cells from every cell
    # boundary of both levels (the encoding is trilinear inside cells, only C0 across them)
    cfg = HashGridConfig(n_levels=2, n_features=2, log2_table_size=14, base_resolution=8, per_level_scale=2.0)
    t2 = jax.random.normal(jax.random.key(0), (2, 2 ** 14, 2))
    rng = np.random.default_rng(0)
    x2 = jnp.asarray((rng.integers(0, 16, (64, 3)) + rng.uniform(0.2, 0.8, (64, 3))) / 16, jnp.float32)
    w = jax.random.normal(jax.random.key(2), (64, 4))
    f = lambda xx: jnp.sum(encode(t2, xx, cfg) * w)
    gx = jax.grad(f)(x2)
    d = jnp.asarray(rng.uniform(-1, 1, x2.shape), jnp.float32)
    eps = 1e-3  # moves a point by <= 0.03 cells of the finest level
    fd = (f(x2 + eps * d) - f(x2 - eps * d)) / (2 * eps)
    assert float(jnp.sum(gx * d)) == pytest.approx(float(fd), rel=1e-2)


def test_progressive_mask():
    m = lambda s: np.asarray(progressive_mask(s, 10, start_level=4, update_steps=100)).tolist()
    assert m(0) == [1.0] * 4 + [0.0] * 6
    assert m(99) == m(0) and m(100) == [1.0] * 5 + [0.0] * 5
    assert m(10_000) == [1.0] * 10
    assert np.asarray(progressive_mask(0, 10, update_steps=0)).sum() == 10
    traced = jax.jit(lambda s: progressive_mask(s, 10, start_level=2, update_steps=10))(jnp.int32(35))
    assert float(traced.sum()) == 5
