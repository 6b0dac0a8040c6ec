"""Kuhn tet grid: counts, orientation, conformity, unique edges, cache and memory errors."""
from __future__ import annotations

import numpy as np
import pytest

from tsjax.geometry.tets import LOCAL_EDGES, build_tet_grid, grid_counts, tet_edge_table, tet_grid


@pytest.mark.parametrize("n", [1, 3, 8])
def test_counts_orientation_and_edges(n, tmp_path, monkeypatch):
    monkeypatch.setenv("TSJAX_CACHE", str(tmp_path))
    g = build_tet_grid(n)
    c = grid_counts(n)
    assert g.verts.shape == (c["verts"], 3) and g.tets.shape == (c["tets"], 4)
    assert g.edges.shape == (c["edges"], 2) and g.tet_edges.shape == (c["tets"], 6)
    assert g.tets.dtype == np.int32 and g.edges.dtype == np.int32 and g.verts.dtype == np.float32
    np.testing.assert_allclose(g.verts.min(0), -0.5)
    np.testing.assert_allclose(g.verts.max(0), 0.5)
    p = g.verts[g.tets].astype(np.float64)
    vol = np.linalg.det(p[:, 1:] - p[:, :1]) / 6
    np.testing.assert_allclose(vol, 1.0 / (6 * n ** 3), rtol=1e-4)  # all positive, equal volumes
    np.testing.assert_allclose(vol.sum(), 1.0, rtol=1e-5)  # they tile the cube
    # the analytic edge table equals the sort-based unique edges of the tets
    e_ref, te_ref = tet_edge_table(g.tets)
    assert len(e_ref) == len(g.edges)
    assert np.array_equal(np.sort(g.edges[g.tet_edges], -1), np.sort(g.tets[:, LOCAL_EDGES], -1))
    assert (g.edges[:, 0] < g.edges[:, 1]).all()
    assert len(np.unique(g.edges[:, 0].astype(np.int64) * len(g.verts) + g.edges[:, 1])) == len(g.edges)


def test_conforming_faces():
    """Every interior triangle is shared by exactly two tets, boundary ones by one (2 per cube face cell)."""
    n = 4
    g = build_tet_grid(n, cache=False)
    faces = np.sort(g.tets[:, [[0, 1, 2], [0, 1, 3], [0, 2, 3], [1, 2, 3]]].reshape(-1, 3), -1)
    _, counts = np.unique(faces, axis=0, return_counts=True)
    assert set(np.unique(counts)) == {1, 2}
    assert (counts == 1).sum() == 6 * 2 * n * n


def test_scale_and_cache_roundtrip(tmp_path, monkeypatch):
    monkeypatch.setenv("TSJAX_CACHE", str(tmp_path))
    v, t = tet_grid(5, scale=2.0)
    assert (tmp_path / "tets" / "kuhn_N5.npz").is_file()
    np.testing.assert_allclose(np.abs(v).max(), 1.0)
    v2, t2 = tet_grid(5, scale=2.0)  # from the cache
    assert np.array_equal(t, t2) and np.array_equal(v, v2)
    g = build_tet_grid(5, scale=2.0)
    assert g.resolution == 5 and g.cell_size == pytest.approx(0.4)


def test_memory_limit_and_bad_input():
    with pytest.raises(ValueError, match=r"resolution 192 needs ~.* bytes"):
        build_tet_grid(192, max_bytes=10 ** 9, cache=False)
    with pytest.raises(ValueError, match="resolution must be a positive integer"):
        build_tet_grid(0)
    with pytest.raises(ValueError, match="scale must be a positive"):
        build_tet_grid(4, scale=-1.0)
