"""Built-in init model (nearest exemplar by silhouette + concept proportions) and the DMTet fit to it."""
import dataclasses

import jax
import numpy as np

from tsjax.data.builtin import builtin_theme
from tsjax.render.camera import make_cameras
from tsjax.render.mesh_render import render_mesh
from tsjax.theme.init import backproject_colors, fit_dmtet_to_mesh, nearest_exemplar_init, silhouette_iou


def test_silhouette_iou():
    a = np.zeros((4, 4), bool); a[:2] = True
    b = np.zeros((4, 4), bool); b[1:3] = True
    assert silhouette_iou(a, b) == 4 / 12 and silhouette_iou(a, a) == 1.0 and silhouette_iou(a * 0, a * 0) == 0.0


def test_nearest_exemplar_is_found_and_stretched():
    ex = builtin_theme("toy-houses")
    cams = make_cameras(np.array([20.0]), np.array([30.0]), 2.2, fovy=40.0)
    for i in range(len(ex)):
        mask = np.asarray(render_mesh(ex[i], cams, 64, lighting="none")["mask"])[0, ..., 0] > 0.5
        mesh, info = nearest_exemplar_init(ex, mask, cams)
        assert info["exemplar"] == i and info["iou"][i] > 0.99
        np.testing.assert_allclose(info["scale"], 1.0, atol=0.05)
    # a concept twice as wide as tall: the init is stretched along X/Z
    mask = np.zeros((64, 64), bool); mask[24:40, 8:56] = True
    mesh, info = nearest_exemplar_init(ex, mask, cams)
    sx, sy, _ = info["scale"]
    assert sx / sy > 1.2
    ext = mesh.vertices.max(0) - mesh.vertices.min(0)
    assert np.isclose(ext.max(), 1.0, atol=1e-4)


def test_backprojected_points_lie_on_surface_with_their_colours():
    from scipy.spatial import cKDTree
    m = builtin_theme("toy-houses")[0]
    pts, cols = backproject_colors(m, 4, 48, jax.random.key(0))
    assert len(pts) > 1000
    # distance to dense surface samples is below a few pixels' footprint
    import trimesh
    tm = trimesh.Trimesh(m.vertices, m.faces, process=False)
    dense, _ = trimesh.sample.sample_surface(tm, 100000, seed=0)
    d, _ = cKDTree(dense).query(pts)
    assert np.percentile(d, 95) < 0.02
    # colours are (sRGB of) the mesh's vertex colours
    from tsjax.render.shading import linear_to_srgb
    palette = np.unique(np.round(np.asarray(linear_to_srgb(m.colors)), 2), axis=0)
    dist = np.min(np.linalg.norm(cols[:, None] - palette[None], axis=-1), axis=1)
    assert np.median(dist) < 0.03


def test_fit_dmtet_to_mesh_reproduces_shape_and_colour():
    from tsjax.geometry.dmtet import DMTetConfig, albedo, extract, init
    from tsjax.geometry.hashgrid import HashGridConfig
    from tsjax.geometry.marching import compact_mesh
    from tsjax.geometry.tets import build_tet_grid
    from tsjax.metrics.geometric import chamfer_distance
    m = builtin_theme("toy-houses")[1]
    hg = HashGridConfig(n_levels=6, n_features=2, log2_table_size=14, base_resolution=8, per_level_scale=1.5)
    dm = DMTetConfig(grid_resolution=24, max_faces=20000, sdf_grid=hg, material_grid=hg, sdf_hidden=32,
                     material_hidden=32)
    geo = fit_dmtet_to_mesh(init(jax.random.key(0), dm), dm, m, jax.random.key(1), sdf_steps=300, n_points=4096,
                            albedo_steps=200, color_views=4, color_resolution=48)
    tm = extract(geo, build_tet_grid(24), dm)
    v, f = compact_mesh(tm)
    cd = chamfer_distance((v, f), (m.vertices, m.faces), n=5000)
    assert cd < 0.03, cd
    pts, cols = backproject_colors(m, 2, 32, jax.random.key(5))
    err = np.abs(np.asarray(albedo(geo, pts, dm)) - cols).mean()
    assert err < 0.08, err
