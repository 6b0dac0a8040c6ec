"""Pure-JAX reference rasterizer, interpolate and texture: analytic coverage, ray-cast agreement,
gradients, bad input."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from jax.test_util import check_grads

from tsjax.ops import interpolate, rasterize, texture
from tsjax.ops.rasterize import barycentrics_from_ids
from tsjax.render import camera as C


def _sphere_views(res=48):
    m = trimesh.creation.icosphere(3, radius=0.4)
    cams = C.make_cameras(jnp.array([0.0, 25.0, -10.0]), jnp.array([0.0, 60.0, 200.0]), 1.6, fovy=60.0)
    return m, cams, C.world_to_clip(jnp.asarray(m.vertices, jnp.float32), cams)


def test_single_triangle_coverage_and_barycentrics():
    # Triangle covering the lower-left half of NDC, w = 1 (orthographic-like).
    pos = jnp.array([[-1.0, -1.0, 0.0, 1.0], [1.0, -1.0, 0.0, 1.0], [-1.0, 1.0, 0.0, 1.0]])
    tris = jnp.array([[0, 1, 2]], jnp.int32)
    r = np.asarray(rasterize(pos, tris, (8, 8), backend="ref"))[0]
    ids = r[..., 3]
    # pixel (i, j) centre: x = (2j+1)/8-1, y = 1-(2i+1)/8; inside when x + y <= 0
    i, j = np.mgrid[0:8, 0:8]
    x, y = (2 * j + 1) / 8 - 1, 1 - (2 * i + 1) / 8
    np.testing.assert_array_equal(ids > 0, x + y <= 1e-7)
    # affine barycentrics: P = u*p0 + v*p1 + (1-u-v)*p2
    u, v = r[..., 0], r[..., 1]
    px = -u + v - (1 - u - v)
    py = -u - v + (1 - u - v)
    np.testing.assert_allclose(px[ids > 0], x[ids > 0], atol=1e-6)
    np.testing.assert_allclose(py[ids > 0], y[ids > 0], atol=1e-6)


def test_sphere_ids_match_embree_ray_casting():
    m, cams, pc = _sphere_views(48)
    rast = np.asarray(rasterize(pc, jnp.asarray(m.faces, jnp.int32), (48, 48), backend="ref"))
    inv = np.linalg.inv(np.asarray(cams.proj))
    c2w = np.asarray(cams.c2w)
    xs = (2 * np.arange(48) + 1) / 48 - 1
    ndc = np.stack(np.meshgrid(xs, -xs), -1).reshape(-1, 2)
    agree = covered = 0
    for b in range(3):
        p = np.concatenate([ndc, np.full((ndc.shape[0], 1), -1.0), np.ones((ndc.shape[0], 1))], 1) @ inv[b].T
        d_cam = p[:, :3] / p[:, 3:]
        d = d_cam @ c2w[b, :3, :3].T
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        o = np.broadcast_to(c2w[b, :3, 3], d.shape)
        hit = m.ray.intersects_first(o, d)  # -1 for miss
        ids = rast[b, ..., 3].reshape(-1).astype(np.int64) - 1
        cov = (ids >= 0) | (hit >= 0)
        covered += cov.sum()
        agree += (ids[cov] == hit[cov]).sum()
    assert agree / covered >= 0.999, agree / covered


def test_perspective_correct_interpolation_reproduces_world_positions():
    m, cams, pc = _sphere_views(32)
    f = jnp.asarray(m.faces, jnp.int32)
    rast = rasterize(pc, f, (32, 32), backend="ref")
    pos, _ = interpolate(jnp.asarray(m.vertices, jnp.float32), rast, f)
    # interpolated positions lie on the (faceted) sphere and project back onto their pixel
    cov = np.asarray(rast[..., 3] > 0)
    r = np.linalg.norm(np.asarray(pos)[cov], axis=-1)
    assert r.min() > 0.39 and r.max() < 0.4001
    clip = np.asarray(jax.vmap(lambda p, mvp: jnp.concatenate([p, jnp.ones(p.shape[:-1] + (1,))], -1) @ mvp.T)(
        pos.reshape(3, -1, 3), cams.mvp))
    ndc = clip[..., :2] / clip[..., 3:]
    xs = (2 * np.arange(32) + 1) / 32 - 1
    grid = np.stack(np.meshgrid(xs, -xs), -1).reshape(-1, 2)
    err = np.abs(ndc - grid[None])[cov.reshape(3, -1)]
    assert err.max() < 1e-4


def test_interpolate_and_texture_gradients():
    m, cams, pc = _sphere_views(12)
    f = jnp.asarray(m.faces, jnp.int32)
    rast = rasterize(pc, f, (12, 12), backend="ref")
    attr = jax.random.normal(jax.random.key(0), (m.vertices.shape[0], 3))
    check_grads(lambda a: interpolate(a, rast, f)[0], (attr,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    # gradients w.r.t. clip positions through the recomputed barycentrics, visibility held fixed
    # (finite differences across a silhouette would flip ids; that part is antialias's job).
    # Central differences in float64 so the check is tight.
    ids = rast[..., 3].astype(jnp.int32)
    with jax.enable_x64(True):
        pc64 = jnp.asarray(np.asarray(pc), jnp.float64)
        a64 = jnp.asarray(np.asarray(attr), jnp.float64)

        def loss(p):
            return jnp.sum(interpolate(a64, barycentrics_from_ids(p, f, ids), f)[0] ** 2)

        g = jax.grad(loss)(pc64)
        for seed in range(3):
            d = jax.random.normal(jax.random.key(10 + seed), pc64.shape, jnp.float64)
            fd = (loss(pc64 + 1e-6 * d) - loss(pc64 - 1e-6 * d)) / 2e-6
            assert float(jnp.sum(g * d)) == pytest.approx(float(fd), rel=1e-6)
    tex = jax.random.uniform(jax.random.key(1), (8, 8, 3))
    uv = jax.random.uniform(jax.random.key(2), (2, 5, 5, 2), minval=0.05, maxval=0.95)
    check_grads(lambda t: texture(t, uv), (tex,), order=1, modes=["rev"], atol=1e-2, rtol=1e-2)
    with jax.enable_x64(True):  # uv: piecewise linear, so tiny central differences in float64
        t64, uv64 = (jnp.asarray(np.asarray(x), jnp.float64) for x in (tex, uv))

        def tloss(u):
            return jnp.sum(texture(t64, u) ** 2)

        g = jax.grad(tloss)(uv64)
        d = jax.random.normal(jax.random.key(3), uv64.shape, jnp.float64)
        fd = (tloss(uv64 + 1e-8 * d) - tloss(uv64 - 1e-8 * d)) / 2e-8
        assert float(jnp.sum(g * d)) == pytest.approx(float(fd), rel=1e-5)


def test_texture_conventions():
    tex = jnp.arange(12.0).reshape(3, 4, 1)
    # texel centres return exact texel values; uv (0,0) is row 0, column 0
    uv = jnp.array([[[[0.5 / 4, 0.5 / 3], [3.5 / 4, 2.5 / 3]]]])
    np.testing.assert_allclose(np.asarray(texture(tex, uv))[0, 0, :, 0], [0.0, 11.0])
    # wrap vs clamp at the edge
    uv = jnp.array([[[[0.0, 0.5 / 3]]]])
    assert float(texture(tex, uv, boundary_mode="wrap")[0, 0, 0, 0]) == pytest.approx(1.5)
    assert float(texture(tex, uv, boundary_mode="clamp")[0, 0, 0, 0]) == pytest.approx(0.0)


def test_bad_input_and_degenerate_triangles():
    pos = jnp.array([[0.0, 0.0, 0.0, 1.0], [0.5, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 1.0], [0.0, 0.5, 0.0, -1.0]])
    tris = jnp.array([[0, 1, 2], [0, 1, 3], [0, 0, 0]], jnp.int32)  # collinear, behind camera, repeated
    r = rasterize(pos, tris, (16, 16), backend="ref")
    assert float(r[..., 3].max()) == 0.0 and np.all(np.isfinite(np.asarray(r)))
    with pytest.raises(ValueError, match="out of range"):
        rasterize(pos, jnp.array([[0, 1, 7]], jnp.int32), (8, 8), backend="ref")
    with pytest.raises(ValueError, match="NaN"):
        rasterize(pos.at[0, 0].set(jnp.nan), tris, (8, 8), backend="ref")
    with pytest.raises(ValueError, match="resolution"):
        rasterize(pos, tris, (0, 8), backend="ref")
    with pytest.raises(ValueError, match="resolution"):
        rasterize(pos, tris, (100000, 8), backend="ref")
    with pytest.raises(ValueError, match="backend"):
        rasterize(pos, tris, (8, 8), backend="opengl")


def test_barycentric_analytic_backward_matches_autodiff():
    # the hand-written VJP of the perspective-correct barycentrics (u, v and z/w) equals JAX's
    # autodiff of the same forward formulas, in float64, including uncovered pixels (zero gradient)
    from tsjax.ops.rasterize import _persp_bary, _persp_terms

    rng = np.random.default_rng(0)
    with jax.enable_x64(True):
        tri = rng.uniform(-1, 1, (400, 3, 4))
        tri[..., 3] = rng.uniform(0.5, 2.0, (400, 3))
        tri = jnp.asarray(tri)
        px, py = (jnp.asarray(rng.uniform(-0.5, 0.5, 400)) for _ in range(2))
        cov = jnp.asarray(rng.uniform(size=400) > 0.2)
        wts = jnp.asarray(rng.normal(size=(3, 400)))

        def custom(t):
            return sum(jnp.sum(wts[k] * o) for k, o in enumerate(_persp_bary(t, px, py, cov)))

        def auto(t):
            outs = _persp_terms(t, px, py, cov)[0]
            return sum(jnp.sum(wts[k] * jnp.where(cov, o, 0.0)) for k, o in enumerate(outs))

        g1, g2 = np.asarray(jax.grad(custom)(tri)), np.asarray(jax.grad(auto)(tri))
    assert np.abs(g2).max() > 1.0
    np.testing.assert_allclose(g1, g2, rtol=1e-9, atol=1e-9 * np.abs(g2).max())
    assert np.all(g1[~np.asarray(cov)] == 0.0)
