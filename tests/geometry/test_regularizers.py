"""Regularisers: hand-computed values on tiny meshes and images, masking of unused slots."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.geometry.marching import TriMesh, marching_tets
from tsjax.geometry.regularizers import (laplacian_smoothness, mask_sparsity, normal_consistency,
                                         opacity_entropy, sdf_sign_change, total_variation)
from tsjax.geometry.tets import build_tet_grid


def _trimesh(v, f, pad_f=3, pad_v=2):
    v = jnp.concatenate([jnp.asarray(v, jnp.float32), jnp.zeros((pad_v, 3), jnp.float32)])
    f = np.concatenate([np.asarray(f, np.int32), np.zeros((pad_f, 3), np.int32)])
    fm = np.arange(len(f)) < len(f) - pad_f
    vm = np.arange(len(v)) < len(v) - pad_v
    return TriMesh(v, jnp.asarray(f), jnp.asarray(fm), jnp.asarray(vm),
                   jnp.int32(fm.sum()), jnp.int32(vm.sum()), jnp.int32(0))


def test_sdf_sign_change_value():
    sdf = jnp.array([-1.0, 2.0, 3.0])
    edges = jnp.array([[0, 1], [1, 2]], jnp.int32)  # only (0, 1) changes sign
    sp = lambda x: np.log1p(np.exp(x))
    # BCE(sigmoid(-1), 1) + BCE(sigmoid(2), 0) = softplus(1) + softplus(2)
    assert float(sdf_sign_change(sdf, edges)) == pytest.approx(sp(1.0) + sp(2.0), rel=1e-6)
    assert float(sdf_sign_change(jnp.abs(sdf), edges)) == 0.0
    g = jax.grad(sdf_sign_change)(sdf, edges)
    # descent moves each end towards the sign of the other (s0 up, s1 down), other edges are untouched
    assert float(g[0]) < 0 and float(g[1]) > 0 and float(g[2]) == 0


def test_normal_consistency_fold_and_plane():
    v = [[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]]
    flat = _trimesh(v, [[0, 1, 2], [0, 2, 3]])
    assert float(normal_consistency(flat)) == pytest.approx(0.0, abs=1e-6)
    folded = _trimesh([[0, 0, 0], [1, 0, 0], [1, 1, 0], [0, 0, 1]], [[0, 1, 2], [0, 3, 1]])
    # the normals (0,0,1) and (0,1,0) are perpendicular: 1 - cos = 1 on the one shared edge
    assert float(normal_consistency(folded)) == pytest.approx(1.0, abs=1e-6)
    g = build_tet_grid(16, cache=False)
    m = marching_tets(g.verts, g.verts[:, 1] - 0.01, g, max_faces=3000)
    assert float(normal_consistency(m)) < 1e-6
    s = marching_tets(g.verts, np.linalg.norm(g.verts, axis=1) - 0.3, g, max_faces=4000)
    assert 0 < float(normal_consistency(s)) < 0.02


def test_laplacian_matches_numpy():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(5, 3)).astype(np.float32)
    f = np.array([[0, 1, 2], [0, 2, 3], [0, 3, 4]], np.int32)
    nbrs = {0: [1, 2, 2, 3, 3, 4], 1: [0, 2], 2: [0, 1, 0, 3], 3: [0, 2, 0, 4], 4: [0, 3]}
    ref = np.mean([np.sum((v[nbrs[i]].mean(0) - v[i]) ** 2) for i in range(5)])
    assert float(laplacian_smoothness(_trimesh(v, f))) == pytest.approx(ref, rel=1e-5)
    flat = _trimesh([[0, 0, 0], [1, 0, 0], [0.5, 0.5, 0]], [[0, 1, 2]])
    assert float(laplacian_smoothness(flat)) > 0
    g = jax.grad(lambda vv: laplacian_smoothness(_trimesh(vv, f, pad_v=0)))(jnp.asarray(v))
    assert np.isfinite(np.asarray(g)).all()


def test_image_terms():
    img = jnp.zeros((1, 4, 4, 1)).at[:, :, 2:].set(1.0)
    # one vertical edge: |dx| = 1 on 4 of 12 horizontal pairs, dy = 0
    assert float(total_variation(img)) == pytest.approx(4 / 12)
    assert float(mask_sparsity(img)) == pytest.approx(0.5)
    assert float(opacity_entropy(img)) == pytest.approx(0.0, abs=1e-3)
    assert float(opacity_entropy(jnp.full((1, 2, 2, 1), 0.5))) == pytest.approx(np.log(2), rel=1e-5)
