"""DMTet fields: init, bounded deformation, SDF fitting to a sphere and to a holed multi-part mesh."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from tsjax.geometry.dmtet import (DMTetConfig, DMTetModel, albedo, extract, fit_sdf, init, mesh_sdf,
                                  param_labels, sdf_and_deform, sphere_sdf, winding_number)
from tsjax.geometry.hashgrid import HashGridConfig
from tsjax.geometry.marching import compact_mesh

SMALL = HashGridConfig(log2_table_size=16)


def _cfg(n=32, **kw):
    return DMTetConfig(grid_resolution=n, max_faces=30000, sdf_grid=SMALL, material_grid=SMALL, **kw)


def test_init_shapes_and_bounded_deformation():
    cfg = _cfg(deform_fraction=0.3)
    p = init(jax.random.key(0), cfg)
    assert set(p) == {"sdf_enc", "sdf_mlp", "mat_enc", "mat_mlp"}
    assert p["sdf_enc"].shape == (10, 2 ** 16, 2)
    assert jax.tree_util.tree_structure(param_labels(p)) == jax.tree_util.tree_structure(p)
    x = jax.random.uniform(jax.random.key(1), (100, 3), minval=-0.5, maxval=0.5)
    s, d = sdf_and_deform(p, x, cfg)
    assert s.shape == (100,) and d.shape == (100, 3) and float(jnp.abs(d).max()) == 0.0
    big = jax.tree_util.tree_map(lambda a: a + 100.0, p["sdf_mlp"]["deform"])
    p2 = {**p, "sdf_mlp": {**p["sdf_mlp"], "deform": big}}
    enc = {**p2, "sdf_enc": p2["sdf_enc"] * 1e4}  # large features -> saturated tanh
    _, d2 = sdf_and_deform(enc, x, cfg)
    assert float(jnp.abs(d2).max()) <= 0.3 * cfg.cell_size * (1 + 1e-6)
    assert float(jnp.abs(d2).max()) > 0.29 * cfg.cell_size
    a = albedo(p, x.reshape(10, 10, 3), cfg)
    assert a.shape == (10, 10, 3) and float(a.min()) > 0 and float(a.max()) < 1
    with pytest.raises(ValueError, match="deform_fraction"):
        DMTetConfig(deform_fraction=0.7)


def test_fit_sphere_then_extract():
    cfg = _cfg()
    model = DMTetModel(cfg)
    p = model.fit_sdf(model.init(jax.random.key(0)), sphere_sdf(0.3), jax.random.key(1), steps=150)
    m = model.extract(p, model.grid(), step=0)
    v, f = compact_mesh(m)
    r = np.linalg.norm(v, axis=1)
    assert int(m.overflow) == 0 and len(f) > 5000
    assert abs(r.mean() - 0.3) < 0.005 and r.std() < 0.01  # measured ~0.0005 and ~0.004
    tm = trimesh.Trimesh(v, f, process=False)
    assert tm.volume == pytest.approx(4 / 3 * np.pi * 0.3 ** 3, rel=0.05)


def _holed_two_part_mesh():
    """A box and an overlapping sphere (two parts, self-intersecting union) with faces removed."""
    box = trimesh.creation.box((0.5, 0.3, 0.4))
    box.apply_translation((-0.1, -0.05, 0.0))
    sph = trimesh.creation.icosphere(subdivisions=3, radius=0.2)
    sph.apply_translation((0.2, 0.1, 0.0))
    keep = np.ones(len(sph.faces), bool)
    keep[::37] = False  # holes
    v = np.concatenate([box.vertices, sph.vertices]).astype(np.float32)
    f = np.concatenate([box.faces, sph.faces[keep] + len(box.vertices)]).astype(np.int32)

    def inside(p):
        q = np.abs(p - [-0.1, -0.05, 0.0]) - [0.25, 0.15, 0.2]
        return (q.max(1) < 0) | (np.linalg.norm(p - [0.2, 0.1, 0.0], axis=1) < 0.2)

    return v, f, inside


def test_winding_number_and_mesh_sdf_sign_on_holed_multipart_mesh():
    v, f, inside = _holed_two_part_mesh()
    pts = np.random.default_rng(0).uniform(-0.5, 0.5, (4000, 3)).astype(np.float32)
    w = winding_number(v, f, pts)
    truth = inside(pts)
    assert ((w > 0.5) == truth).mean() > 0.99
    assert w[truth & (np.linalg.norm(pts - [-0.1, -0.05, 0.0], axis=1) < 0.1)].min() > 0.9
    s = mesh_sdf(v, f, n_surface=50_000)(pts)
    assert ((s < 0) == truth).mean() > 0.99
    # magnitude: this point is 0.25 from the sphere part (and ~0.255 from the box)
    assert mesh_sdf(v, f, n_surface=50_000)(np.array([[0.2, 0.1, 0.45]]))[0] == pytest.approx(0.25, abs=0.01)


def test_fit_mesh_voxel_iou():
    v, f, inside = _holed_two_part_mesh()
    cfg = _cfg()
    p = init(jax.random.key(0), cfg)
    p = fit_sdf(p, cfg, mesh_sdf(v, f, n_surface=50_000), jax.random.key(1), steps=200, n_points=60_000)
    grid = DMTetModel(cfg).grid()
    s, _ = sdf_and_deform(p, grid.verts, cfg, 0)
    pred, truth = np.asarray(s) < 0, inside(grid.verts)
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > 0.9, iou
    m = extract(p, grid, cfg, 0)
    assert int(m.num_faces) > 1000 and int(m.overflow) == 0


def test_close_boundary_caps_a_shape_that_leaves_the_grid():
    """A ball of radius 0.6 around the origin pokes out of all six faces of the [-0.5, 0.5]^3 grid: the
    plain surface is open there; with ``close_boundary`` it is capped, closed, and its volume is that of
    the ball clipped to the cube."""
    cfg = DMTetConfig(grid_resolution=16, max_faces=20000, sdf_grid=SMALL, material_grid=SMALL)
    p = fit_sdf(init(jax.random.key(0), cfg), cfg, sphere_sdf(0.6), jax.random.key(1), steps=100,
                n_points=50_000, step=None)
    grid = DMTetModel(cfg).grid()
    open_mesh = trimesh.Trimesh(*compact_mesh(extract(p, grid, cfg)), process=False)
    assert not open_mesh.is_watertight
    closed = trimesh.Trimesh(*compact_mesh(extract(p, grid, cfg.replace(close_boundary=True))), process=False)
    assert closed.is_watertight and closed.is_winding_consistent
    # Monte-Carlo volume of {|x| < 0.6} within the cube: 0.798 (measured mesh volume 0.802)
    x = np.random.default_rng(0).uniform(-0.5, 0.5, (400_000, 3))
    assert closed.volume == pytest.approx(float((np.linalg.norm(x, axis=1) < 0.6).mean()), rel=0.03)
    np.testing.assert_allclose(np.abs(closed.vertices).max(), 0.5, atol=1e-5)  # the caps lie on the faces
