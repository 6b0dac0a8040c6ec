"""End to end on the tiny preset with the real from-scratch priors (reduced steps), and the paper-preset
stage-2 step lowered at full size with ``jax.eval_shape``.

The tiny run goes through every stage of ``python -m tsjax.optimize`` (exemplar renders, VAE + theme prior
trained from scratch, concept sampling, reference prior, nearest-exemplar init + DMTet fit, concept prior
with img2img pseudo views, DSD stage 2, GLB/OBJ export, turntables, gallery).

Not asserted here: that the result's palette is closer to the exemplars' with the reference prior than
without it (``guidance.mode=concept_only``). At this reduced size the difference is smaller than the
spread over stage-2 seeds and over numerically equivalent kernels, and its sign is not stable. Palette
distance (unlit albedo turntable vs the exemplars' renders, Lab sliced W1, lower = closer), stage-2 seeds
0 / 1 / 2 on the same shared stages: with XLA's conv, attention and GroupNorm (``ead81b5``) concept only
6.18 / 5.80 / 5.71, DSD 6.15 / 5.65 / 5.68; with the native CPU kernels (``2668ba8``, same math to
~1e-6) concept only 5.99 / 5.88 / 5.60, DSD 6.28 / 6.27 / 5.95, ref_dominated 6.29 / 7.27 / 6.46; with the
reference prior trained 300 steps on 12 renders instead of 100 on 8, concept only 6.79 / 6.54 / 6.39,
DSD 6.48 / 7.27 / 6.38. A check on these numbers would pass or fail by chance. On the full tiny preset
(the ``make demo`` run's shared stages, 300 steps, stage-2 seeds 0 / 1 / 2 / 3) the reference prior moves
the palette slightly away instead: concept only 7.02 / 6.93 / 7.28 / 7.19, DSD 7.56 / 7.33 / 7.63 / 7.13.
"""
import json

import numpy as np
import pytest

#: the tiny preset with fewer steps/views (same resolution 64, same networks); ~3-4 min on 2 idle cores.
REDUCED = ["theme_prior.n_views=8", "theme_prior.train.vae_steps=120", "theme_prior.steps_group=160",
           "theme_prior.n_concepts=2", "theme_prior.sample_steps=12", "reference_prior.train.steps=100",
           "reference_prior.n_color=8", "concept_prior.train.steps=80",
           "concept_prior.steps_before_aug=40", "concept_prior.n_init_views=4", "concept_prior.img2img_steps=10",
           "init.sdf_fit_steps=120", "init.albedo_fit_steps=80", "render.turntable_views=6",
           "render.turntable_resolution=96", "render.texture_size=128", "checkpoint_every=1000"]
STEPS = 90


def _args(out, extra=()):
    args = ["--out", str(out), "--steps", str(STEPS), "--no-progress", "--exemplars", "builtin:toy-houses"]
    for s in REDUCED + list(extra):
        args += ["--set", s]
    return args


#: the run, made once per process (``make test`` sends a whole file to one xdist worker with
#: ``--dist loadfile``; a worker may still tear a module fixture down and set it up again between two of
#: its tests, and a rerun costs minutes; the run folders live in the session's tmp dir, which outlives
#: the fixture).
_RUNS: dict = {}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``{"dsd": out_dir}``."""
    if not _RUNS:
        _RUNS.update(_make_runs(tmp_path_factory))
    return dict(_RUNS)


def _make_runs(tmp_path_factory):
    from tsjax.optimize import main

    root = tmp_path_factory.mktemp("e2e")
    dsd = root / "dsd"
    assert main(_args(dsd)) == 0
    return {"dsd": dsd}


def _manifest(out):
    return json.loads((out / "manifest.json").read_text())


def _metrics(out):
    return [json.loads(line) for line in (out / "asset_0" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_outputs_exist_and_are_valid(runs):
    import trimesh
    from PIL import Image

    out = runs["dsd"]
    man = _manifest(out)
    assert man["config"] == "tiny" and man["guidance_mode"] == "dsd" and len(man["assets"]) == 1
    a = man["assets"][0]
    assert a["stage2_steps"] == STEPS and len(_metrics(out)) == STEPS
    scene = trimesh.load(out / a["glb"], force="scene")
    (geom,) = scene.geometry.values()
    assert len(geom.faces) == a["num_faces"] > 500
    assert np.isfinite(geom.vertices).all() and np.abs(geom.vertices).max() < 0.6  # inside the 1.1 grid
    tex = geom.visual.material.baseColorTexture
    assert tex is not None and tex.size == (128, 128)
    assert np.asarray(tex).std() > 2.0  # a painted texture, not a constant
    assert (out / a["obj"]).is_file() and (out / "asset_0" / "model.mtl").is_file()
    tt = np.asarray(Image.open(out / a["turntable_color"]).convert("RGB"), np.float32) / 255
    assert tt.shape[0] >= 96 and tt.shape[1] >= 6 * 96
    assert 0.02 < (tt < 0.9).any(-1).mean() < 0.9  # the object is on screen and not filling every frame
    html = (out / "index.html").read_text()
    for rel in (a["turntable_color"], a["turntable_normal"], a["concept"], a["init_png"], a["loss_curve"]):
        assert rel in html and (out / rel).is_file()
    assert all(np.isfinite(r["loss"]) and r["finite"] == 1.0 for r in _metrics(out))


def _window_means(values, frac=0.25):
    a = np.asarray(values, np.float64)
    w = max(int(len(a) * frac), 1)
    return a[:w].mean(), a[-w:].mean()


@pytest.mark.slow
def test_tiny_stage2_objective_decreases(runs):
    """Stage 2 makes progress on its objective; the DSD term itself stays bounded.

    The logged ``loss`` (DSD + contextual + regularisers, the function whose gradient is applied) is
    compared in windows (mean of the first vs the last quarter of the steps; per-step values are noisy
    because t and the noise are random). The DSD term is the VSD surrogate
    ``0.5 * ||w(t) (eps_prior_cfg - eps_lora)||^2``: the size of the distillation gradient, not a quantity
    VSD drives to zero (with CFG the prior and the LoRA never agree), and in the tiny preset it stays
    roughly level (measured 2.15 -> 2.27, window means, in this 90-step run; the total 272 -> 190); the
    check is that it does not diverge. The tiny preset distils colour only, so the normal term is 0.
    """
    recs = _metrics(runs["dsd"])
    first, last = _window_means([r["loss"] for r in recs])
    assert last < 0.95 * first, (first, last)
    d0, d1 = _window_means([r["loss_dsd"] for r in recs])
    assert 0 < d1 < 1.5 * d0, (d0, d1)
    c0, c1 = _window_means([r["loss_contextual"] for r in recs])
    assert c1 < c0, (c0, c1)
    for term in ("loss_concept", "loss_ref_color", "loss_lora"):
        assert all(np.isfinite(r[term]) and r[term] > 0 for r in recs), term
    assert all(r["loss_ref_normal"] == 0.0 for r in recs)  # tiny distils colour only (configs/tiny.py)


@pytest.mark.slow
def test_tiny_result_differs_from_every_exemplar(runs):
    """Chamfer distance (unit-cube units, 5000 samples) from the result to every exemplar.

    The built-in init is the exemplar nearest to the concept silhouette, fitted by DMTet, and the tiny
    preset's low geometry learning rates keep its massing, so the stated thresholds are: the result is
    further from that source exemplar than the DMTet fit of the exemplar itself is (+0.001; measured fit
    0.0239, result 0.0308: a no-op stage 2 fails this), and further than 0.05 from every other exemplar
    (measured 0.073-0.081).
    """
    from tsjax.config import load_config
    from tsjax.data.mesh import load_exemplars
    from tsjax.geometry.dmtet import extract
    from tsjax.geometry.marching import compact_mesh
    from tsjax.geometry.tets import build_tet_grid
    from tsjax.metrics.geometric import chamfer_distance
    from tsjax.theme.pipeline import _load_tree, build_dmtet_config

    man = _manifest(runs["dsd"])
    ch = man["assets"][0]["chamfer_to_exemplars"]
    assert len(ch) == man["num_exemplars"] == 4
    src = man["assets"][0]["init"]["exemplar"]
    dm = build_dmtet_config(load_config("tiny"))
    grid = build_tet_grid(dm.grid_resolution, scale=dm.grid_scale)
    fit = compact_mesh(extract(_load_tree(runs["dsd"] / "asset_0" / "geo_init.msgpack"), grid, dm))
    ex = load_exemplars("builtin:toy-houses")[src]
    fit_err = chamfer_distance(fit, (ex.vertices, ex.faces), n=5000)
    assert 0.0 < fit_err < 0.04, fit_err  # the init fit is close to its exemplar
    assert ch[src] > fit_err + 0.001, (ch[src], fit_err)
    assert all(c > 0.05 for i, c in enumerate(ch) if i != src), ch


@pytest.mark.slow
def test_paper_step_lowers_at_full_size():
    """The paper-preset stage-2 step traced with ``jax.eval_shape`` at full size (SD2.1-base UNet x3 + LoRA,
    SD VAE encoder, 512 px, 192^3 tet grid, 4 contextual views), nothing allocated or run."""
    import dataclasses

    import jax
    import jax.numpy as jnp

    from tsjax.config import load_config
    from tsjax.diffusion.clip_text import CLIPTextConfig
    from tsjax.diffusion.sampling import TINY_SCHEDULER, DiffusionModel
    from tsjax.diffusion.unet import UNetConfig
    from tsjax.diffusion.vae import VAEConfig
    from tsjax.geometry.dmtet import init as dm_init
    from tsjax.geometry.tets import TetGrid
    from tsjax.guidance.dsd import DSDSettings, PriorPrompts
    from tsjax.guidance.vsd import Denoiser
    from tsjax.theme import stage2 as S
    from tsjax.theme.pipeline import _lora_parts, build_dmtet_config

    cfg = load_config("paper")
    g, R = cfg.guidance, cfg.render.resolution
    # stabilityai/stable-diffusion-2-1-base unet/config.json (+ the camera embedding of the priors)
    ucfg = UNetConfig(sample_size=64, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                      use_linear_projection=True, camera_embed_dim=16)
    model = DiffusionModel(ucfg, VAEConfig.sd(), CLIPTextConfig.sd2(), dict(TINY_SCHEDULER), None, {})
    S_ = jax.ShapeDtypeStruct
    key = jax.random.key(0)
    unet = jax.eval_shape(lambda k: model.unet.init(k, jnp.zeros((1, 64, 64, 4)), jnp.zeros((1,), jnp.int32),
                                                    jnp.zeros((1, 77, 1024)), jnp.zeros((1, 16)))["params"], key)
    vae = jax.eval_shape(lambda k: model.vae.init(k, jnp.zeros((1, 512, 512, 3)))["params"], key)
    n_unet = sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(unet))
    assert 860e6 < n_unet < 870e6  # SD2.1-base UNet: 865.9M (+ camera embedding)
    dm = build_dmtet_config(cfg)
    N = dm.grid_resolution
    assert N == 192
    grid = TetGrid(verts=S_(((N + 1) ** 3, 3), jnp.float32), tets=S_((6 * N ** 3, 4), jnp.int32),
                   edges=S_((3 * N * (N + 1) ** 2 + 3 * N * N * (N + 1) + N ** 3, 2), jnp.int32),
                   tet_edges=S_((6 * N ** 3, 6), jnp.int32), resolution=N, scale=dm.grid_scale)
    lora_train, lora_apply = _lora_parts(model, unet, g.lora_rank, key)
    tbl = S_((4, 77, 1024), jnp.float32)
    unc = S_((77, 1024), jnp.float32)
    apply = lambda p, x, t, c, cam: model.unet_apply(p, x, t, c, cam)  # noqa: E731
    prior = lambda: PriorPrompts(Denoiser(apply, unet), tbl, tbl, unc)  # noqa: E731
    K, n_ctx = g.contextual_views, cfg.concept_prior.n_init_views
    spec = S.Stage2Spec(dmtet=dm, resolution=R, batch_size=cfg.render.batch_size, context_views=K,
                        contextual_weight=g.contextual_weight,
                        dsd=DSDSettings(concept_t=g.high_t, reference_t=g.low_t, alpha=g.alpha, beta=g.beta,
                                        guidance_scale=g.guidance_scale, camera_dropout=g.camera_dropout),
                        reg=cfg.reg, camera=cfg.camera, vae_encode=model.vae_encode,
                        scaling_factor=model.scaling_factor, lora_apply=lora_apply, scheduler=model.scheduler,
                        features=S.patch_features)
    feats = jax.eval_shape(lambda x: S.patch_features(None, x), S_((n_ctx, R, R, 3), jnp.float32))
    inputs = S.Stage2Inputs(grid=grid, vae=vae, concept=prior(), reference=prior(), lora_base=unet,
                            lora_color=tbl, lora_normal=tbl, context_feats=feats,
                            context_c2w=S_((n_ctx, 4, 4), jnp.float32), context_proj=S_((n_ctx, 4, 4), jnp.float32))
    opt = S.make_optimizer(cfg.optim, g.lora_lr)
    bg = S.init_background(key)
    state = jax.eval_shape(lambda k, lt: S.init_state(dm_init(k, dm), bg, lt, opt), key, lora_train)
    step = S.make_step(dataclasses.replace(spec), opt)
    new, m = jax.eval_shape(step, state, inputs, key)
    assert jax.tree_util.tree_structure(new) == jax.tree_util.tree_structure(state)
    assert all(a.shape == b.shape for a, b in zip(jax.tree_util.tree_leaves(new), jax.tree_util.tree_leaves(state)))
    assert m["loss"].shape == () and m["loss_dsd"].dtype == jnp.float32
