"""Rendering the DMTet surface: silhouette/normal/depth against an analytic sphere, colours, gradients."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.geometry.dmtet import DMTetConfig, DMTetModel, fit_sdf, init, sphere_sdf
from tsjax.geometry.hashgrid import HashGridConfig
from tsjax.geometry.render import render
from tsjax.render.camera import make_cameras

SMALL = HashGridConfig(log2_table_size=16)
CFG = DMTetConfig(grid_resolution=32, max_faces=20000, sdf_grid=SMALL, material_grid=SMALL)
R, D, FOV = 0.3, 2.0, 40.0


@pytest.fixture(scope="module")
def sphere_params():
    p = init(jax.random.key(0), CFG)
    p = fit_sdf(p, CFG, sphere_sdf(R), jax.random.key(1), steps=150)
    # constant material: sRGB albedo 0.25 everywhere
    layers = [dict(w=jnp.zeros_like(l["w"]), b=jnp.zeros_like(l["b"])) for l in p["mat_mlp"]["layers"]]
    layers[-1]["b"] = jnp.full((3,), float(np.log(0.25 / 0.75)))
    return {**p, "mat_mlp": {"layers": layers}}


def test_render_sphere(sphere_params):
    grid = DMTetModel(CFG).grid()
    cams = make_cameras(jnp.array([0.0, 30.0]), jnp.array([0.0, 120.0]), D, FOV)
    f = jax.jit(lambda p, g: render(p, g, cams, 64, CFG, step=0, background=(1.0, 0.0, 1.0), return_mesh=True))
    out = f(sphere_params, grid)
    assert out["color"].shape == (2, 64, 64, 3) and out["mask"].shape == (2, 64, 64, 1)
    assert int(out["mesh"].overflow) == 0
    # silhouette area of a sphere seen from distance D with fovy FOV
    frac = np.pi * (np.tan(np.arcsin(R / D)) / np.tan(np.radians(FOV) / 2)) ** 2 / 4
    hard = jax.jit(lambda p, g: render(p, g, cams, 64, CFG, step=0, antialias=False))(sphere_params, grid)
    np.testing.assert_allclose(np.asarray(hard["mask"]).mean((1, 2, 3)), frac, rtol=0.02)
    # tsjax.ops.antialias blends at the edge of the front pixel's own triangle; on a mesh of ~1 px
    # triangles that is often an interior edge, so the antialiased silhouette is ~0.4 px too small
    # (measured -5 % area here at 64 px, -1.5 % at 256 px, also for an exact analytic-SDF mesh)
    np.testing.assert_allclose(np.asarray(out["mask"]).mean((1, 2, 3)), frac, rtol=0.08)
    c = (slice(None), 32, 32)
    np.testing.assert_allclose(np.asarray(out["depth"][c][:, 0]), D - R, atol=0.01)
    # the centre pixel sees the point of the sphere facing the camera: normal = direction to the camera
    n = np.asarray(out["normal"][c]) * 2 - 1
    to_cam = np.asarray(cams.c2w[:, :3, 3]) / D
    assert (np.sum(n * to_cam, -1) > 0.98).all()
    np.testing.assert_allclose(np.asarray(out["albedo"][c]), 0.25, atol=1e-4)
    np.testing.assert_allclose(np.asarray(out["color"][c]), 0.25, atol=1e-4)  # unlit
    np.testing.assert_allclose(np.asarray(out["color"][:, 0, 0]), [[1, 0, 1]] * 2, atol=1e-6)  # background
    np.testing.assert_allclose(np.asarray(out["normal"][:, 0, 0]), [[1, 0, 1]] * 2, atol=1e-6)
    lit = jax.jit(lambda p, g: render(p, g, cams, 64, CFG, step=0, shading="lambert"))(sphere_params, grid)
    m = np.asarray(out["mask"][..., 0]) > 0.999
    assert np.asarray(lit["color"])[m].max() <= 0.25 + 1e-4 and np.asarray(lit["color"])[m].min() > 0.1


def test_render_gradients_reach_sdf_and_material(sphere_params):
    grid = DMTetModel(CFG).grid()
    cams = make_cameras(jnp.array([10.0]), jnp.array([30.0]), D, FOV)

    @jax.jit
    def terms(p, g):
        o = render(p, g, cams, 48, CFG, step=0)
        return jnp.stack([jnp.mean(o["mask"]), jnp.mean(o["color"])])

    jac = jax.jacrev(terms)(sphere_params, grid)  # one backward pass per term, one compilation
    for k in ("sdf_enc", "sdf_mlp", "mat_mlp"):
        flat = jax.flatten_util.ravel_pytree(jac[k])[0]
        assert bool(jnp.isfinite(flat).all()) and float(jnp.abs(flat).max()) > 0, k
    # the mask does not depend on the material
    mask_wrt_material = jax.tree_util.tree_map(lambda a: a[0], jac["mat_mlp"])
    assert float(jnp.abs(jax.flatten_util.ravel_pytree(mask_wrt_material)[0]).max()) == 0
    # growing the mask: d(mean mask)/d(SDF output bias) < 0 (a uniformly smaller SDF is a bigger sphere)
    assert float(jac["sdf_mlp"]["layers"][-1]["b"][0, 0]) < 0


def test_no_surface_renders_background_with_finite_gradients(sphere_params):
    """An SDF that is positive everywhere (no surface): empty mesh, a warning outside jit, background
    images, zero mask and finite (zero) gradients, never NaN."""
    grid = DMTetModel(CFG).grid()
    last = sphere_params["sdf_mlp"]["layers"][-1]
    empty = {**sphere_params, "sdf_mlp": {**sphere_params["sdf_mlp"],
                                          "layers": sphere_params["sdf_mlp"]["layers"][:-1]
                                          + [{**last, "b": last["b"] + 10.0}]}}
    with pytest.warns(RuntimeWarning, match="all one sign"):
        m = DMTetModel(CFG).extract(empty, grid, step=0)
    assert int(m.num_faces) == 0 and int(m.overflow) == 0
    cams = make_cameras(jnp.array([10.0]), jnp.array([30.0]), D, FOV)

    def loss(p, g):
        o = render(p, g, cams, 32, CFG, step=0)
        return jnp.mean(o["mask"]) + jnp.mean((o["color"] - 0.5) ** 2) + jnp.mean(o["normal"]), o

    (val, out), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(empty, grid)
    assert float(jnp.abs(out["mask"]).max()) == 0.0 and float(jnp.abs(out["depth"]).max()) == 0.0
    np.testing.assert_allclose(np.asarray(out["color"]), 1.0)
    np.testing.assert_allclose(float(val), 0.25 + 1.0, rtol=1e-6)
    flat = jax.flatten_util.ravel_pytree(grads)[0]
    assert bool(jnp.isfinite(flat).all()) and float(jnp.abs(flat).max()) == 0.0
