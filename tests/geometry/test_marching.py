"""Marching tets: analytic surfaces, orientation, watertightness, gradients, static shapes, edge cases."""
from __future__ import annotations

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from tsjax.geometry.marching import NUM_TRIS, TRI_TABLE, _marching, compact_mesh, marching_tets
from tsjax.geometry.tets import build_tet_grid


def _area_volume(v, f):
    p = v[f].astype(np.float64)
    cr = np.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    return 0.5 * np.linalg.norm(cr, axis=1).sum(), (p[:, 0] * cr).sum() / 6.0


def _box_sdf(x, h):
    q = np.abs(x) - h
    return np.linalg.norm(np.maximum(q, 0), axis=1) + np.minimum(q.max(1), 0)


def test_table_counts():
    assert NUM_TRIS.tolist() == [0, 1, 1, 2, 1, 2, 2, 1, 1, 2, 2, 1, 2, 1, 1, 0]
    # complementary cases use the same edges with the opposite orientation
    for c in range(16):
        for s in range(NUM_TRIS[c]):
            assert sorted(TRI_TABLE[c, s]) in [sorted(t) for t in TRI_TABLE[15 - c, :NUM_TRIS[c]]]


# (grid, rel. tolerance on area, on volume): measured errors sphere 0.3%/0.5% @32, 0.07%/0.14% @64
@pytest.mark.parametrize("n,tol_a,tol_v", [(32, 0.01, 0.01), (64, 0.003, 0.003)])
def test_sphere_area_volume_watertight(n, tol_a, tol_v):
    g = build_tet_grid(n)
    r = 0.3
    m = marching_tets(g.verts, np.linalg.norm(g.verts, axis=1) - r, g, max_faces=60000)
    assert int(m.overflow) == 0
    v, f = compact_mesh(m)
    area, vol = _area_volume(v, f)
    assert area == pytest.approx(4 * np.pi * r * r, rel=tol_a)
    assert vol == pytest.approx(4 / 3 * np.pi * r ** 3, rel=tol_v)  # positive volume: normals point out
    tm = trimesh.Trimesh(v, f, process=False)
    assert tm.is_watertight and tm.is_winding_consistent
    assert len(v) - len(tm.edges_unique) + len(f) == 2  # genus 0
    np.testing.assert_allclose(np.linalg.norm(v, axis=1), r, atol=0.01 * 32 / n)
    # faces beyond num_faces are the degenerate (0, 0, 0) face
    assert not np.asarray(m.faces)[int(m.num_faces):].any()
    assert np.asarray(m.face_mask).sum() == int(m.num_faces)


# box edges are chamfered by linear interpolation: measured area error 4.1% @32, 1.9% @64
@pytest.mark.parametrize("n,tol_a,tol_v", [(32, 0.05, 0.015), (64, 0.025, 0.005)])
def test_box_area_volume(n, tol_a, tol_v):
    g = build_tet_grid(n)
    h = np.array([0.3, 0.2, 0.25])
    m = marching_tets(g.verts, _box_sdf(g.verts, h), g, max_faces=60000)
    area, vol = _area_volume(*compact_mesh(m))
    assert area == pytest.approx(8 * (h[0] * h[1] + h[0] * h[2] + h[1] * h[2]), rel=tol_a)
    assert vol == pytest.approx(8 * h.prod(), rel=tol_v)


def test_raw_tets_argument_matches_grid():
    g = build_tet_grid(6, cache=False)
    sdf = np.linalg.norm(g.verts - 0.03, axis=1) - 0.27
    a = marching_tets(g.verts, sdf, g, max_faces=2000)
    b = marching_tets(g.verts, sdf, g.tets, max_faces=2000)
    assert int(a.num_faces) == int(b.num_faces) > 0
    np.testing.assert_allclose(_area_volume(*compact_mesh(a)), _area_volume(*compact_mesh(b)), rtol=1e-6)


@pytest.mark.parametrize("n", [1, 12])
def test_structured_kuhn_path_equals_table_path(n):
    """The Kuhn-grid path (bitset rank/select, strided slices) gives bit-identical buffers to the
    generic unique-edge-table path, with ample and with overflowing capacities."""
    g = build_tet_grid(n, cache=False)
    rng = np.random.default_rng(n)
    noisy = rng.normal(size=len(g.verts)).astype(np.float32)  # every case code, many crossings
    sphere = (np.linalg.norm(g.verts, axis=1) - 0.3).astype(np.float32)
    for sdf in (noisy, sphere):
        for mf, mv in ((40000, 40000), (3000, 3000), (50, 20)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                a = marching_tets(g.verts, sdf, g, max_faces=mf, max_verts=mv)
            b = _marching(jnp.asarray(g.verts), jnp.asarray(sdf), g.tets, g.edges, g.tet_edges, max_faces=mf,
                          max_verts=mv)
            for name, x, y in zip(a._fields, a, b):
                assert np.array_equal(np.asarray(x), np.asarray(y)), (n, mf, name)
    assert int(a.num_faces) > 0 or n == 1


def _loss_fn(g, w_v):
    def loss(sdf, verts):
        m = marching_tets(verts, sdf, g, max_faces=1500, max_verts=800)
        p = m.verts[m.faces]
        cr = jnp.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        area = 0.5 * jnp.sum(jnp.sqrt(jnp.sum(cr * cr, -1) + 1e-20) * m.face_mask)
        return area + jnp.sum(m.verts * w_v)
    return loss


def test_gradients_match_finite_differences():
    g = build_tet_grid(6, cache=False)
    rng = np.random.default_rng(0)
    sdf = (np.linalg.norm(g.verts * [1.0, 1.3, 0.8], axis=1) - 0.3).astype(np.float32)
    # keep |sdf| away from 0 so +-eps perturbations do not change the topology
    sdf = np.where(np.abs(sdf) < 0.02, np.sign(sdf + 1e-9) * 0.02, sdf).astype(np.float32)
    verts = g.verts.copy()
    w_v = jnp.asarray(rng.normal(size=(800, 3)), jnp.float32)
    loss = jax.jit(_loss_fn(g, w_v))
    gs, gv = jax.grad(loss, argnums=(0, 1))(sdf, verts)
    assert np.abs(np.asarray(gs)).max() > 0 and np.abs(np.asarray(gv)).max() > 0
    eps = 1e-3
    for i in range(4):
        ds = rng.normal(size=sdf.shape).astype(np.float32)
        dv = rng.normal(size=verts.shape).astype(np.float32) * 0.01
        fd = (loss(sdf + eps * ds, verts + eps * dv) - loss(sdf - eps * ds, verts - eps * dv)) / (2 * eps)
        an = float(jnp.sum(gs * ds) + jnp.sum(gv * dv))
        assert an == pytest.approx(float(fd), rel=2e-2, abs=2e-3)


def test_compiles_once_for_changing_surfaces():
    g = build_tet_grid(16, cache=False)
    traces = []

    @jax.jit
    def step(radius, offset):
        traces.append(1)
        sdf = jnp.linalg.norm(g.verts - offset, axis=1) - radius
        m = marching_tets(g.verts, sdf, g, max_faces=8000)
        return m.num_faces, m.overflow

    counts = set()
    for i in range(20):
        nf, ov = step(jnp.float32(0.05 + 0.02 * i), jnp.full((3,), 0.01 * i, jnp.float32))
        counts.add(int(nf))
    assert len(traces) == 1
    assert len(counts) == 20  # the surface really changed each time


def test_empty_surface_warns_and_stays_finite():
    g = build_tet_grid(8, cache=False)
    sdf = np.full(len(g.verts), 0.5, np.float32)
    with pytest.warns(RuntimeWarning, match="all one sign"):
        m = marching_tets(g.verts, sdf, g, max_faces=100)
    assert int(m.num_faces) == 0 and int(m.num_verts) == 0 and int(m.overflow) == 0
    assert not np.asarray(m.faces).any() and not np.asarray(m.face_mask).any()
    with pytest.warns(RuntimeWarning, match="all one sign"):
        grad = jax.grad(lambda s: jnp.sum(marching_tets(g.verts, s, g, max_faces=100).verts ** 2))(-sdf)
    assert np.isfinite(np.asarray(grad)).all()


def test_overflow_is_reported_and_faces_stay_valid():
    g = build_tet_grid(16, cache=False)
    sdf = np.linalg.norm(g.verts, axis=1) - 0.3
    full = marching_tets(g.verts, sdf, g, max_faces=20000)
    with pytest.warns(RuntimeWarning, match="did not fit"):
        m = marching_tets(g.verts, sdf, g, max_faces=500, max_verts=200)
    assert int(m.num_faces) <= 500 and int(m.num_faces) + int(m.overflow) == int(full.num_faces)
    f = np.asarray(m.faces)[np.asarray(m.face_mask)]
    assert f.max() < 200
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        marching_tets(g.verts, sdf, g, max_faces=20000)  # no warning when it fits


def test_bad_input():
    g = build_tet_grid(4, cache=False)
    with pytest.raises(ValueError, match="sdf"):
        marching_tets(g.verts, np.zeros(3), g, max_faces=10)
    with pytest.raises(ValueError, match="max_faces"):
        marching_tets(g.verts, np.zeros(len(g.verts)), g, max_faces=0)
