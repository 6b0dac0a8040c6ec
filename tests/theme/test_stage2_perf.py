"""Stage-2 perf switches (tsjax.config.PerfConfig) change the implementation, not the function.

Tiny size: 32 px renders, 8^3 tet grid, the real tiny Flax UNet (camera-conditioned, attention) as the
concept prior, the reference prior and the LoRA base, a toy strided-conv VAE encoder with a compute dtype.

Stated tolerances (relative L2 error of the gradient of each parameter group, relative error of each loss term):
  * optimised float32 (fused UNet passes, one extraction, fused contextual loss, donation, remat "dots")
    vs the plain float32 variant (PLAIN_PERF): <= 2e-4 (float32 round-off only);
  * optimised float32 with Winograd convs (``conv_algorithm`` winograd2 / winograd4): the same 2e-4;
  * optimised bfloat16 (frozen weights stored in bf16, bf16 compute, fp32 masters) vs plain float32:
    loss terms <= 3e-2, gradient groups <= 0.1 relative L2 with cosine similarity >= 0.99 (measured at
    this size: terms <= 7e-3, groups <= 3e-2, cosine >= 0.9995).
The compile-once + donation check of the optimised (default) step is in tests/theme/test_stage2.py.
"""
import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.config import PLAIN_PERF, CameraConfig, OptimConfig, PerfConfig, RegularizerConfig
from tsjax.diffusion.sampling import TINY_SCHEDULER
from tsjax.diffusion.schedulers import DDIMScheduler
from tsjax.diffusion.unet import UNet2DConditionModel, UNetConfig
from tsjax.geometry.dmtet import DMTetConfig, fit_sdf, init, sphere_sdf
from tsjax.geometry.hashgrid import HashGridConfig
from tsjax.geometry.tets import build_tet_grid
from tsjax.guidance.dsd import DSDSettings, PriorPrompts
from tsjax.guidance.vsd import Denoiser
from tsjax.ops import conv as conv_ops
from tsjax.render.camera import make_cameras
from tsjax.theme import stage2 as s2

RES, L = 16, 6
OPT32 = PerfConfig(compute_dtype="float32", remat="dots")
OPT16 = PerfConfig(compute_dtype="bfloat16")


class ToyVAEEncoder(nn.Module):
    """Two strided convs (x4 down) -> (mean, logvar) with 4 latent channels; computes in ``dtype``."""

    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        h = nn.silu(nn.Conv(16, (3, 3), (2, 2), dtype=self.dtype, param_dtype=jnp.float32)(x))
        h = nn.Conv(8, (3, 3), (2, 2), dtype=self.dtype, param_dtype=jnp.float32)(h)
        return h[..., :4], h[..., 4:]


def build(perf: PerfConfig, base: dict):
    """Spec + inputs for ``perf`` from the float32 ``base`` (modules cloned per compute dtype)."""
    unet = s2.compute_module(base["unet"], perf)
    vae = s2.compute_module(base["vae"], perf)
    apply = lambda p, x, t, c, cam: unet.apply({"params": p}, x, t, c, cam)  # noqa: E731

    def lora_apply(p, x, t, c, cam):  # trainable camera embedding + output offset on the frozen base
        prm = dict(p["base"], camera_embedding=p["train"]["camera_embedding"])
        return unet.apply({"params": prm}, x, t, c, cam) + p["train"]["delta"]

    spec = dataclasses.replace(base["spec"], vae_encode=lambda p, x: vae.apply({"params": p}, x),
                               lora_apply=lora_apply, perf=perf)
    inp = base["inputs"]
    inp = inp.replace(concept=inp.concept.replace(denoiser=Denoiser(apply, inp.concept.denoiser.params)),
                      reference=inp.reference.replace(denoiser=Denoiser(apply, inp.reference.denoiser.params)))
    return spec, s2.prepare_inputs(inp, perf)


@pytest.fixture(scope="module")
def base():
    # one-level tiny UNet (resnet + cross-attention transformer + mid block): every layer type, small compile
    ucfg = UNetConfig.tiny(camera_embed_dim=16, cross_attention_dim=16, sample_size=RES // 4, block_out_channels=(32,),
                           down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
                           attention_head_dim=(4,))
    unet, vae = UNet2DConditionModel(ucfg), ToyVAEEncoder()
    ups = [unet.init_params(jax.random.key(i), seq_len=L) for i in range(3)]
    vp = vae.init(jax.random.key(9), jnp.zeros((1, RES, RES, 3)))["params"]
    tbl = lambda k: 0.5 * jax.random.normal(jax.random.key(k), (4, L, 16))  # noqa: E731
    pp = lambda k, p: PriorPrompts(Denoiser(None, p), tbl(k), tbl(k + 1), jnp.zeros((L, 16)))  # noqa: E731
    hg = HashGridConfig(n_levels=3, n_features=2, log2_table_size=10, base_resolution=4, per_level_scale=1.5)
    dm = DMTetConfig(grid_resolution=8, max_faces=1500, sdf_grid=hg, material_grid=hg, sdf_hidden=16,
                     material_hidden=16, progressive_update_steps=0)
    grid = build_tet_grid(8, cache=False)
    geo = fit_sdf(init(jax.random.key(0), dm), dm, sphere_sdf(0.3), jax.random.key(1), steps=30, n_points=2000,
                  batch=2000, step=None)
    ccams = make_cameras(np.zeros(4), np.linspace(-180, 90, 4), 1.6, fovy=70.0)
    targets = jax.random.uniform(jax.random.key(5), (4, RES, RES, 3))
    spec = s2.Stage2Spec(dmtet=dm, resolution=RES, batch_size=2, context_views=2, contextual_weight=1.0,
                         dsd=DSDSettings(guidance_scale=3.0), reg=RegularizerConfig(), camera=CameraConfig(),
                         vae_encode=None, scaling_factor=0.5, lora_apply=None,
                         scheduler=DDIMScheduler.from_config(TINY_SCHEDULER), features=s2.patch_features,
                         backend="ref")
    inputs = s2.Stage2Inputs(grid=grid, vae=vp, concept=pp(10, ups[0]), reference=pp(20, ups[1]), lora_base=ups[2],
                             lora_color=tbl(30), lora_normal=tbl(31), context_feats=s2.patch_features(None, targets),
                             context_c2w=ccams.c2w, context_proj=ccams.proj)
    train = {"camera_embedding": ups[2]["camera_embedding"], "delta": jnp.zeros(())}
    opt = s2.make_optimizer(OptimConfig(lr_geometry_encoding=1e-2, lr_material=1e-2), 1e-3)
    state = s2.init_state(geo, s2.init_background(jax.random.key(3)), train, opt)
    out = dict(unet=unet, vae=vae, spec=spec, inputs=inputs, opt=opt, state=state)
    spec0, inp0 = build(PLAIN_PERF, out)
    out["plain"] = s2.make_grad_fn(spec0)(state.params, state.step, inp0, jax.random.key(7))
    return out


def _group_errors(g, ref):
    errs = {}
    for name in ("geo", "bg", "lora"):
        a = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(g[name])]).astype(np.float64)
        b = np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(ref[name])]).astype(np.float64)
        assert np.linalg.norm(b) > 0, name
        errs[name] = (np.linalg.norm(a - b) / np.linalg.norm(b), float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)))
    return errs


def _term_errors(m, ref):
    keys = [k for k in s2.LOSS_TERMS if abs(float(ref[k])) > 0]
    assert {"loss_concept", "loss_ref_color", "loss_ref_normal", "loss_lora", "loss_contextual"} <= set(keys)
    return {k: abs(float(m[k]) - float(ref[k])) / abs(float(ref[k])) for k in keys}


def test_optimised_fp32_matches_plain(base):
    spec, inp = build(OPT32, base)
    st = base["state"]
    g, m = s2.make_grad_fn(spec)(st.params, st.step, inp, jax.random.key(7))
    g0, m0 = base["plain"]
    assert float(m["num_faces"]) == float(m0["num_faces"]) > 50
    for k, e in _term_errors(m, m0).items():
        assert e <= 2e-4, (k, e)
    for k, (e, _) in _group_errors(g, g0).items():
        assert e <= 2e-4, (k, e)


def test_bf16_matches_plain_within_tolerance(base):
    spec, inp = build(OPT16, base)
    assert jax.tree_util.tree_leaves(inp.concept.denoiser.params)[0].dtype == jnp.bfloat16
    st = base["state"]
    g, m = s2.make_grad_fn(spec)(st.params, st.step, inp, jax.random.key(7))
    g0, m0 = base["plain"]
    terms = _term_errors(m, m0)
    groups = _group_errors(g, g0)
    print("bf16 vs fp32 plain: terms", terms, "groups", groups)
    for k, e in terms.items():
        assert e <= 3e-2, (k, e)
    for k, (e, cos) in groups.items():
        assert e <= 0.1 and cos >= 0.99, (k, e, cos)


@pytest.mark.skipif(not conv_ops.native_available(), reason="native CPU conv kernels not built")
@pytest.mark.parametrize("algo", ["winograd2", "winograd4"])
def test_winograd_fp32_matches_plain(base, monkeypatch, algo):
    """``perf.conv_algorithm`` reaches the convs of the step (the UNets' 3x3 convs run on the Winograd
    kernel: the tiny maps are below the production pixel threshold, lowered to 0 here) and changes only
    the round-off: both within the optimised float32 bound, 2e-4 (measured: terms <= 4e-7, gradient
    groups <= 1.9e-6 for F(2x2), <= 3.2e-6 for F(4x4))."""
    monkeypatch.setattr(conv_ops, "WINOGRAD_MIN_PIXELS", {2: 0, 4: 0})
    spec, inp = build(dataclasses.replace(OPT32, conv_algorithm=algo), base)
    st = base["state"]
    fn = s2.make_grad_fn(spec)
    args = (st.params, st.step, inp, jax.random.key(7))
    assert f"m = {algo[-1]} : i64" in fn.lower(*args).as_text()
    g, m = fn(*args)
    g0, m0 = base["plain"]
    for k, e in _term_errors(m, m0).items():
        assert e <= 2e-4, (k, e)
    for k, (e, _) in _group_errors(g, g0).items():
        assert e <= 2e-4, (k, e)


def test_perf_config_rejects_unknown_conv_algorithm():
    with pytest.raises(ValueError, match="conv_algorithm"):
        PerfConfig(conv_algorithm="fft")
