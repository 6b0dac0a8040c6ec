"""Stage-2 step on toy denoisers: one compilation, finite named terms, parameters move, NaN guard."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.config import CameraConfig, OptimConfig, RegularizerConfig
from tsjax.diffusion.sampling import TINY_SCHEDULER
from tsjax.diffusion.schedulers import DDIMScheduler
from tsjax.geometry.dmtet import DMTetConfig, fit_sdf, init, sphere_sdf
from tsjax.geometry.hashgrid import HashGridConfig
from tsjax.geometry.tets import build_tet_grid
from tsjax.guidance.dsd import DSDSettings, PriorPrompts
from tsjax.guidance.vsd import Denoiser
from tsjax.theme import stage2 as s2
from toy_models import ToyUNet, ToyVAEEnc, toy_lora_apply

L, D, RES = 6, 8, 32


def _toy_setup(context_views=2):
    unet, vae = ToyUNet(), ToyVAEEnc()
    x = jnp.zeros((1, RES // 4, RES // 4, 4))
    ctx = jnp.zeros((1, L, D))
    up = [unet.init(jax.random.key(i), x, jnp.zeros((1,), jnp.int32), ctx, jnp.zeros((1, 16)))["params"]
          for i in range(3)]
    vp = vae.init(jax.random.key(9), jnp.zeros((1, RES, RES, 3)))["params"]
    apply = lambda p, x, t, c, cam: unet.apply({"params": p}, x, t, c, cam)

    lora_apply = toy_lora_apply(apply)  # "LoRA": trainable camera embedding + additive delta on the base

    tbl = lambda k: jax.random.normal(jax.random.key(k), (4, L, D))
    pp = lambda k, p: PriorPrompts(Denoiser(apply, p), tbl(k), tbl(k + 1), jnp.zeros((L, D)))
    hg = HashGridConfig(n_levels=4, n_features=2, log2_table_size=12, base_resolution=4, per_level_scale=1.5)
    dm = DMTetConfig(grid_resolution=12, max_faces=4000, sdf_grid=hg, material_grid=hg, sdf_hidden=16,
                     material_hidden=16, progressive_update_steps=0)
    grid = build_tet_grid(12, cache=False)
    geo = fit_sdf(init(jax.random.key(0), dm), dm, sphere_sdf(0.3), jax.random.key(1), steps=60, n_points=4000,
                  batch=2000, step=None)
    sched = DDIMScheduler.from_config(TINY_SCHEDULER)
    n_ctx = 4
    from tsjax.render.camera import make_cameras
    ccams = make_cameras(np.zeros(n_ctx), np.linspace(-180, 90, n_ctx), 1.6, fovy=70.0)
    targets = jnp.clip(jax.random.uniform(jax.random.key(5), (n_ctx, RES, RES, 3)), 0, 1)
    spec = s2.Stage2Spec(dmtet=dm, resolution=RES, batch_size=1, context_views=context_views,
                         contextual_weight=1.0, dsd=DSDSettings(guidance_scale=3.0), reg=RegularizerConfig(),
                         camera=CameraConfig(), vae_encode=lambda p, x: vae.apply({"params": p}, x),
                         scaling_factor=0.5, lora_apply=lora_apply, scheduler=sched,
                         features=s2.patch_features, backend="ref")
    inputs = s2.Stage2Inputs(grid=grid, vae=vp, concept=pp(10, up[0]), reference=pp(20, up[1]), lora_base=up[2],
                             lora_color=tbl(30), lora_normal=tbl(31),
                             context_feats=s2.patch_features(None, targets), context_c2w=ccams.c2w,
                             context_proj=ccams.proj)
    lora_train = {"camera_embed": up[2]["camera_embed"], "delta": jnp.zeros(())}
    opt = s2.make_optimizer(OptimConfig(lr_geometry_encoding=1e-2, lr_geometry_mlp=1e-3, lr_material=1e-2), 1e-3)
    state = s2.init_state(geo, s2.init_background(jax.random.key(3)), lora_train, opt)
    return spec, opt, inputs, state


def test_step_compiles_once_and_updates():
    spec, opt, inputs, state = _toy_setup()
    step = s2.make_step(spec, opt)
    geo0 = jax.tree_util.tree_map(np.asarray, state.params["geo"])
    delta0 = float(state.params["lora"]["delta"])
    key = jax.random.key(0)
    ms = []
    first = state
    for _ in range(3):
        state, m = step(state, inputs, key)
        ms.append(jax.tree_util.tree_map(float, m))
    assert step._cache_size() == 1
    assert spec.perf.donate and first.step.is_deleted(), "the default step donates its state"
    assert int(state.step) == 3
    for m in ms:
        assert m["finite"] == 1.0
        for k in s2.LOSS_TERMS:
            assert np.isfinite(m[k]), k
        assert m["num_faces"] > 100 and m["overflow"] == 0
        assert m["loss_concept"] > 0 and m["loss_ref_color"] > 0 and m["loss_ref_normal"] > 0
        assert m["loss_contextual"] > 0
    # geometry, material and LoRA all moved
    geo1 = state.params["geo"]
    for k in ("sdf_enc", "mat_enc", "mat_mlp"):
        d = max(float(np.abs(np.asarray(a) - b).max()) for a, b in
                zip(jax.tree_util.tree_leaves(geo1[k]), jax.tree_util.tree_leaves(geo0[k])))
        assert d > 0, k
    assert float(state.params["lora"]["delta"]) != delta0


def test_nonfinite_step_keeps_state():
    spec, opt, inputs, state = _toy_setup(context_views=0)
    bad = dataclasses.replace(inputs, vae=jax.tree_util.tree_map(lambda x: x * jnp.nan, inputs.vae))
    step = s2.make_step(dataclasses.replace(spec, context_views=0), opt)
    before = jax.tree_util.tree_map(np.asarray, state.params)
    state, m = step(state, bad, jax.random.key(0))
    assert float(m["finite"]) == 0.0 and not np.isfinite(float(m["loss"]))
    assert int(state.step) == 0
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(state.params)):
        np.testing.assert_array_equal(a, np.asarray(b))


def test_background_rays_point_away_from_camera():
    from tsjax.render.camera import make_cameras
    cams = make_cameras(np.array([0.0]), np.array([0.0]), 2.0, fovy=60.0)
    d = np.asarray(s2._ray_dirs(cams, 9))
    np.testing.assert_allclose(d[0, 4, 4], [0, 0, -1], atol=1e-6)  # centre pixel looks down -Z
    assert d[0, 0, 4, 1] > 0 and d[0, 4, 0, 0] < 0  # top row looks up, left column looks left
    c = s2.background_color(s2.init_background(jax.random.key(0)), cams, 9)
    assert c.shape == (1, 9, 9, 3) and float(c.min()) > 0 and float(c.max()) < 1


def test_patch_features_cap_the_contextual_matrix():
    """Weight-free contextual features: 64 px renders are patched as they are; larger renders are
    box-filtered first so the feature map stays <= 64 positions a side (512 px: 64x64, not 256x256)."""
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
    f64 = s2.patch_features(None, x)
    assert f64.shape == (2, 32, 32, 75)
    # features are channel-major (c, dy, dx); the centre tap of the 5x5 patch at output (i, j) is input
    # pixel (2i+1, 2j+1) (SAME padding of a stride-2 5x5 window on 64 px: 1 before, 2 after)
    np.testing.assert_array_equal(np.asarray(f64[..., [12, 37, 62]]), np.asarray(x[:, 1::2, 1::2]))
    big = jnp.repeat(jnp.repeat(x, 8, 1), 8, 2)  # 512 px, every pixel repeated 8x8
    f512 = jax.eval_shape(lambda im: s2.patch_features(None, im), big)
    assert f512.shape == (2, 64, 64, 75)
    # the 4x box filter of an 8x-upsampled image is the 2x-upsampled image: same features as at 128 px
    f = s2.patch_features(None, big)
    ref = s2.patch_features(None, jnp.repeat(jnp.repeat(x, 2, 1), 2, 2))
    np.testing.assert_allclose(np.asarray(f), np.asarray(ref), atol=1e-6)
