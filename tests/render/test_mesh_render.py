"""tsjax.render.mesh_render: analytic coverage/normals/depth of a cube, texture mapping orientation,
golden statistics of a built-in render."""
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh

from tsjax.data.builtin import builtin_theme
from tsjax.render.camera import make_cameras
from tsjax.render.mesh_render import render_mesh
from tsjax.render.shading import linear_to_srgb


def _cube():
    b = trimesh.creation.box((1.0, 1.0, 1.0))
    return np.asarray(b.vertices, np.float32), np.asarray(b.faces, np.int32)


def test_cube_front_perspective_mask_normals_depth():
    v, f = _cube()
    d, fovy = 3.0, 30.0
    cams = make_cameras(0.0, 0.0, d, fovy=fovy)
    out = render_mesh((v, f, np.full_like(v, 0.5)), cams, 64, backend="ref")
    # the front face z = 0.5 projects to a square of NDC half-size 0.5 / (d - 0.5) / tan(fovy / 2)
    half = 0.5 / (d - 0.5) / np.tan(np.deg2rad(fovy / 2))
    assert float(out["mask"].mean()) == pytest.approx(half ** 2, abs=0.01)
    c = out["normal"][0, 28:36, 28:36]
    np.testing.assert_allclose(c, np.broadcast_to([0.5, 0.5, 1.0], c.shape), atol=1e-5)
    np.testing.assert_allclose(out["depth"][0, 32, 32, 0], d - 0.5, rtol=1e-4)
    np.testing.assert_allclose(out["normal"][0, 0, 0], [1, 1, 1])  # white background
    assert float(out["depth"][0, 0, 0, 0]) == 0.0


def test_cube_ortho_coverage_side_normal_and_unlit_colour():
    v, f = _cube()
    cams = make_cameras([0.0, 0.0], [0.0, 90.0], 3.0, ortho_half_height=1.0)
    col = np.tile(np.asarray([[0.2, 0.4, 0.8]], np.float32), (len(v), 1))
    out = render_mesh((v, f, col), cams, 32, lighting="none", backend="ref")
    np.testing.assert_allclose(out["mask"].mean(axis=(1, 2, 3)), [0.25, 0.25], atol=1e-3)  # edges on pixel boundaries (AA: < 1 px)
    np.testing.assert_allclose(out["normal"][1, 16, 16], [1.0, 0.5, 0.5], atol=1e-5)  # az 90 sees the +X face
    np.testing.assert_allclose(out["color"][0, 16, 16], linear_to_srgb(jnp.asarray([0.2, 0.4, 0.8])), atol=1e-5)


def test_textured_quad_is_upright_and_not_mirrored():
    # quad in the z = 0 plane, uv (0, 0) at the top-left corner (-0.5, +0.5)
    v = np.array([[-0.5, 0.5, 0], [0.5, 0.5, 0], [0.5, -0.5, 0], [-0.5, -0.5, 0]], np.float32)
    f = np.array([[0, 3, 2], [0, 2, 1]], np.int32)
    uv = np.array([[0, 0], [1, 0], [1, 1], [0, 1]], np.float32)
    tex = np.zeros((2, 2, 3), np.float32)
    tex[0, 0] = (1, 0, 0); tex[0, 1] = (0, 1, 0); tex[1, 0] = (0, 0, 1); tex[1, 1] = (1, 1, 0)
    cams = make_cameras(0.0, 0.0, 2.0, ortho_half_height=0.5)
    out = render_mesh((v, f, np.ones_like(v), uv, tex), cams, 16, lighting="none", antialias=False, backend="ref")
    img = np.asarray(out["color"][0])
    np.testing.assert_allclose(img[2, 2], [1, 0, 0], atol=1e-5)    # top-left: texel row 0 col 0
    np.testing.assert_allclose(img[2, 13], [0, 1, 0], atol=1e-5)   # top-right
    np.testing.assert_allclose(img[13, 2], [0, 0, 1], atol=1e-5)   # bottom-left
    np.testing.assert_allclose(img[13, 13], [1, 1, 0], atol=1e-5)


def test_builtin_render_golden_statistics():
    m = builtin_theme("toy-houses", seed=0)[0]
    cams = make_cameras([0.0, 20.0], [0.0, 45.0], 2.2, fovy=40.0)
    out = render_mesh(m, cams, 48, backend="ref")
    assert out["color"].shape == (2, 48, 48, 3) and out["mask"].shape == (2, 48, 48, 1)
    stats = np.concatenate([np.asarray(out["color"]).mean((0, 1, 2)), [float(out["mask"].mean())]])
    np.testing.assert_allclose(stats, GOLDEN_HOUSE_STATS, atol=2e-3)
    # the ffi/auto backend renders the same image
    auto = render_mesh(m, cams, 48)
    np.testing.assert_allclose(auto["color"], out["color"], atol=1e-4)


# mean sRGB colour (r, g, b) and mask coverage, computed once with the ref backend and frozen
GOLDEN_HOUSE_STATS = np.array([0.91387, 0.84653, 0.81859, 0.34205])
