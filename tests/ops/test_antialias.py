"""Analytic silhouette antialiasing: coverage values, finite-difference gradients w.r.t. vertices."""
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.ops import antialias, interpolate, rasterize

H = W = 32
POS0 = jnp.array([[-0.6, -0.5, 0.0, 1.0], [0.55, -0.45, 0.0, 1.0], [-0.1, 0.6, 0.0, 1.0]])
TRIS = jnp.array([[0, 1, 2]], jnp.int32)


@jax.jit
def _coverage_sum(pos):
    r = rasterize(pos, TRIS, (H, W), backend="ref")
    return antialias((r[..., 3:] > 0).astype(jnp.float32), r, pos, TRIS).sum()


def _area_px(p):
    x = p[:, :2]
    a = (x[1, 0] - x[0, 0]) * (x[2, 1] - x[0, 1]) - (x[1, 1] - x[0, 1]) * (x[2, 0] - x[0, 0])
    return 0.5 * a * (W / 2) * (H / 2)


def test_antialiased_coverage_matches_area():
    # summed antialiased coverage ~ analytic area in pixels (aliased count differs more)
    assert abs(float(_coverage_sum(POS0)) - float(_area_px(POS0))) < 1.5


def test_silhouette_gradient_matches_finite_differences_and_area_derivative():
    g = jax.grad(_coverage_sum)(POS0)
    ga = jax.grad(_area_px)(POS0)
    eps = 2e-3
    for vi, ci in [(0, 0), (0, 1), (1, 1), (2, 0), (2, 1)]:
        d = jnp.zeros_like(POS0).at[vi, ci].set(eps)
        fd = float((_coverage_sum(POS0 + d) - _coverage_sum(POS0 - d)) / (2 * eps))
        # central differences of the (piecewise smooth) AA image: 2 % relative or 0.5 pixel^2/NDC
        assert abs(float(g[vi, ci]) - fd) <= 0.02 * abs(fd) + 0.5, (vi, ci, float(g[vi, ci]), fd)
    # sign always, magnitude within 20 % of the analytic area derivative (pixel sampling of the edges)
    for vi in range(3):
        for ci in range(2):
            if abs(float(ga[vi, ci])) > 20:
                assert np.sign(g[vi, ci]) == np.sign(ga[vi, ci])
                assert abs(float(g[vi, ci] - ga[vi, ci])) <= 0.2 * abs(float(ga[vi, ci])), (vi, ci)


def test_occluding_triangle_edge_and_shared_edges():
    # two triangles sharing an edge (a quad): the interior edge is not blended
    pos = jnp.array([[-0.5, -0.5, 0.0, 1.0], [0.5, -0.5, 0.0, 1.0], [0.5, 0.5, 0.0, 1.0], [-0.5, 0.5, 0.0, 1.0]])
    tris = jnp.array([[0, 1, 2], [0, 2, 3]], jnp.int32)
    r = rasterize(pos, tris, (16, 16), backend="ref")
    col, _ = interpolate(jnp.array([[1.0], [1.0], [1.0], [1.0]]), r, tris)
    out = np.asarray(antialias(col, r, pos, tris))
    cov = np.asarray(r[0, ..., 3] > 0)
    interior = cov.copy()  # covered pixels whose 4 neighbours are covered too
    interior[1:] &= cov[:-1]
    interior[:-1] &= cov[1:]
    interior[:, 1:] &= cov[:, :-1]
    interior[:, :-1] &= cov[:, 1:]
    assert interior.sum() > 20
    np.testing.assert_allclose(out[0][interior], 1.0, atol=1e-6)  # no seam along the diagonal
    # occluder in front of a back triangle: the front triangle's edge blends, ids change across it
    back = jnp.array([[-1.0, -1.0, 0.5, 1.0], [3.0, -1.0, 0.5, 1.0], [-1.0, 3.0, 0.5, 1.0]])
    front = jnp.array([[-0.3, -0.6, -0.5, 1.0], [0.63, -0.5, -0.5, 1.0], [0.0, 0.7, -0.5, 1.0]])
    pos2 = jnp.concatenate([back, front])
    tris2 = jnp.array([[0, 1, 2], [3, 4, 5]], jnp.int32)
    r2 = rasterize(pos2, tris2, (24, 24), backend="ref")
    c2 = jnp.where(r2[..., 3:] == 2, 1.0, 0.0)
    out2 = np.asarray(antialias(c2, r2, pos2, tris2))
    frac = (out2 > 1e-4) & (out2 < 1 - 1e-4)
    assert frac.sum() > 10 and np.all(np.isfinite(out2))
    assert abs(out2.sum() - float(_area_px(front) * (24 / 32) ** 2)) < 1.5


def test_analytic_backward_matches_autodiff(monkeypatch):
    # the hand-written VJP of the pair deltas equals JAX's autodiff of the same forward, for the
    # vertex positions and the colours, on a scene with silhouettes, occlusion and shared edges
    import importlib

    import trimesh

    from tsjax.render import camera as C

    aa = importlib.import_module("tsjax.ops.antialias")
    m = trimesh.creation.icosphere(2, radius=0.4)
    cams = C.make_cameras(jnp.array([10.0, -20.0]), jnp.array([20.0, 200.0]), 1.5, fovy=60.0)
    f = jnp.asarray(m.faces, jnp.int32)
    wt = jnp.asarray(np.random.default_rng(1).normal(size=(2, 40, 40, 3)), jnp.float32)

    v = jnp.asarray(m.vertices, jnp.float32)
    r = rasterize(C.world_to_clip(v, cams), f, (40, 40), backend="ref")  # ids held fixed

    def loss(v, tint):
        c, _ = interpolate(v * 0.5 + 0.5, r, f)
        return jnp.sum(antialias(c * tint, r, C.world_to_clip(v, cams), f) * wt)

    tint = jnp.array([0.9, 0.5, 0.2])
    g_custom = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, tint)
    monkeypatch.setattr(aa, "_pair_deltas", lambda *args: aa._pair_core(*args)[0])
    g_auto = jax.jit(jax.grad(loss, argnums=(0, 1)))(v, tint)  # fresh trace: sees the patch
    for gc, ga in zip(g_custom, g_auto):
        assert float(jnp.abs(ga).max()) > 0.1
        np.testing.assert_allclose(np.asarray(gc), np.asarray(ga), rtol=1e-4, atol=1e-4 * float(jnp.abs(ga).max()))


def test_materialize_is_exact_identity_with_identity_gradient():
    from tsjax.ops.antialias import _materialize

    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 5, 7, 3)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(_materialize)(x)), np.asarray(x))
    w = jnp.asarray(np.random.default_rng(4).normal(size=x.shape), jnp.float32)
    g = jax.grad(lambda y: jnp.sum(_materialize(y) * w))(x)
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
