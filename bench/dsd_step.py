"""Benchmark the stage-2 DSD step (issue 7): plain vs optimised, and the guidance part vs diffusers PyTorch.

    python bench/dsd_step.py [--shapes tiny,mid,paper] [--variants plain,optimised] [--peer] [--steps N]
                             [--threads 2] [--out FILE]

Prints one JSON object per line (stdout) and appends them to ``--out`` (default
``bench/results/dsd_step_cpu_<date>.jsonl``).

Shapes (batch B = 1 distilled view per step, as in both presets):

* ``tiny``: the tiny preset (``configs/tiny.py``): tiny camera-conditioned UNet (32/64 channels, context
  32) for the concept prior, the reference prior and the LoRA base, tiny VAE (factor 4), 64 px renders
  -> 16x16 latents, tet grid 32, its hash grids/MLPs, K = 2 contextual views with the weight-free patch
  features (what ``python -m tsjax.optimize`` runs without ``--vgg``), CFG 3.
* ``mid``: UNet blocks 128/256/512 (as ``bench/diffusion.py``'s mid config, cross-attention 768, plus
  the 16-d camera embedding), VAE 64/128/256/256 (factor 8), 256 px renders -> 32x32 latents, tet grid
  64 with the default (paper) hash grid, K = 2 contextual views with VGG19 relu3_4 features (random
  weights), CFG 7.5.
* ``paper``: SD 2.1-base UNets (+ camera embedding), SD VAE, 512 px, tet grid 128 (``--paper-grid``; the
  paper preset uses 192), K = 4 contextual views with VGG19 relu3_4 features, CFG 7.5. On a CPU this is
  lowered and compiled from shapes only (``jax.ShapeDtypeStruct``): compile time, XLA FLOPs and XLA's
  memory analysis; it is not run (memory/time), and the row says so.

Variants: ``plain`` = :data:`tsjax.config.PLAIN_PERF` (fp32, one UNet call per term, two surface
extractions, contextual gradient and update as separate jits, no donation, no remat); ``winograd2`` /
``winograd4`` = ``optimised`` with ``perf.conv_algorithm`` set so (Winograd 3x3 convs on the CPU
kernels; the tsjax guidance peer takes the same choice from ``--peer-conv``); ``optimised`` =
``PerfConfig()`` defaults (on CPU: fp32 because ``compute_dtype="auto"`` is fp32 there, the native CPU
conv and attention kernels, fused UNet passes, one extraction, contextual loss fused into the one jit,
donated state).

Per variant: ``compile_s`` (``.lower().compile()`` of the step's jitted programs; the plain step is
three programs, built exactly as :func:`tsjax.theme.stage2.make_step` builds them, and its compile time
is their sum), ``first_call_s`` (first execution after compilation), step time (min and median of
``--steps`` calls after one warm-up call; each measurement runs in its own process, and the two variants
are interleaved call by call (``_workers.py``: the order rotates every round), then the guidance peers
of each dtype, so that at most three workers hold memory),
peak memory (``peak_rss_mb``: the process's resident high-water mark
``VmHWM`` over the first call and the timed steps, reset after compilation via ``/proc/self/clear_refs``;
``step_mem_mb``: that peak minus the resident size just before the first call, i.e. the working memory
of a step beyond weights/state), ``gflop_per_step`` (XLA ``cost_analysis()['flops']`` summed over the step's
programs, counted by :func:`xla_path_flops` on the same programs traced with the native CPU conv /
attention / GroupNorm kernels off, because XLA counts an FFI custom call as 0 FLOPs; the rasterizer
custom call is still counted as 0, which is negligible next to the UNets) and ``utilisation`` = ``gflop_per_step / step_s_median / peak`` with ``peak`` the float32 matmul
GFLOP/s measured in the same run (``jnp.dot`` 2048^2, best of 5, same thread count), stated in each row.

PyTorch guidance peer (``--peer``, tiny and mid; ``--peer-dtypes float32,bfloat16``): the guidance part
of one step on the SAME weights
(diffusers ``UNet2DConditionModel``/``AutoencoderKL`` created with a fixed seed, ``save_pretrained``,
loaded by tsjax through ``tsjax.diffusion.convert``; the LoRA is tsjax's ``init_lora`` tree saved with
``save_lora_diffusers`` and loaded with diffusers ``load_lora_adapter``) and the same host-drawn noise,
timesteps and camera dropout:

  VAE encode of the colour and the normal render with gradient to the images; reference prior on
  [uncond, cond] x [colour, normal] (4 rows, one call) and concept prior on [uncond, cond] (2 rows) with
  CFG; the LoRA UNet once without gradient on the 3 VSD terms, once with gradient on colour + normal
  (its training loss); VSD losses (w(t) = 1 - abar_t) + LoRA loss, one backward, one AdamW update of the
  LoRA factors and the camera embedding.

Camera conditioning is identical on both sides: our UNet's ``camera_embedding`` is diffusers'
``class_embed_type="projection"`` (a TimestepEmbedding MLP of the flattened 4x4 c2w added to the time
embedding), fed ``class_labels=camera``. The PEFT LoRA targets to_q/to_k/to_v/to_out.0 (rank 4, alpha
= rank), the adapted layers of tsjax's LoRA. tsjax runs the same ops as one jitted function with the
optimised perf settings. Both get ``--threads`` CPU threads (torch ``set_num_threads``, XLA's Eigen pool
via ``--xla_cpu_multi_thread_eigen`` and ``OMP_NUM_THREADS``), and every worker is pinned to that many
cores (``_cpus.py``: XLA's GEMMs otherwise use every core whatever its thread flags). A ``peer_ratio`` line
per pair gives the time ratio (tsjax / PyTorch: of medians, of minima, and the median of the per-round
ratios) and compares the two sides' loss and image gradients on the first call (same weights, same
draws). With ``bfloat16``, tsjax's guidance runs with ``perf.compute_dtype="bfloat16"`` (on a CPU with
AMX-BF16 its convs run on AMX tiles, ``tsjax.ops.conv``), its frozen weights (VAE, priors, LoRA base)
stored in bf16 once, as the stage-2 step stores them (``stage2.prepare_inputs``), and it is compared with
PyTorch under ``torch.autocast("cpu", torch.bfloat16)`` (which casts the float32 weights on every call)
and with PyTorch in float32 (the authors' code runs float32).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpus import pin_from_env, worker_env  # noqa: E402
from _workers import Worker, available_gb, emit_result, interleave, ratio_summary, reset_peak, serve, status_mb  # noqa: E402

PINNED_CPUS = pin_from_env()  # workers: their share of the cores, set before jax/torch load

from tsjax.config import CONV_ALGORITHMS  # noqa: E402  (tsjax.config loads no jax)

HERE = Path(__file__).resolve().parent
L_SEQ = 77  # prompt length of the text tables (CLIP's 77 tokens, the tiny text encoder's too)
N_CTX = {"tiny": 8, "mid": 8, "paper": 20}  # contextual pseudo-views available (init views, config values)

SHAPES = {
    "tiny": dict(res=64, grid=32, K=2, features="patch", guidance_scale=3.0, lora_lr=1e-3, need_gb=2),
    "mid": dict(res=256, grid=64, K=2, features="vgg", guidance_scale=7.5, lora_lr=1e-4, need_gb=6),
    "paper": dict(res=512, grid=128, K=4, features="vgg", guidance_scale=7.5, lora_lr=1e-4, need_gb=6),
}
ALPHA, BETA, CAM_DROPOUT, LORA_RANK = 0.2, 1.0, 0.1, 4


def model_configs(shape: str):
    """``(UNetConfig, VAEConfig)`` of ``shape`` (camera-conditioned UNet, 16-d camera)."""
    from tsjax.diffusion.unet import UNetConfig
    from tsjax.diffusion.vae import VAEConfig

    if shape == "tiny":
        return UNetConfig.tiny(camera_embed_dim=16), VAEConfig.tiny()
    if shape == "mid":
        u = UNetConfig(sample_size=32, block_out_channels=(128, 256, 512), layers_per_block=2,
                       down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                       cross_attention_dim=768, attention_head_dim=(8, 8, 8), norm_num_groups=32, camera_embed_dim=16)
        v = VAEConfig.sd(block_out_channels=(64, 128, 256, 256), sample_size=256)
        return u, v
    if shape == "paper":
        # stabilityai/stable-diffusion-2-1-base unet/config.json + the priors' camera embedding
        u = UNetConfig(sample_size=64, attention_head_dim=(5, 10, 20, 20), cross_attention_dim=1024,
                       use_linear_projection=True, camera_embed_dim=16)
        return u, VAEConfig.sd()
    raise ValueError(f"--shapes: unknown shape {shape!r} (tiny, mid, paper)")


def geometry_config(shape: str, paper_grid: int):
    """The DMTet config of ``shape`` (tiny preset geometry / default geometry at grid 64 / paper preset)."""
    from tsjax.config import load_config
    from tsjax.theme.pipeline import build_dmtet_config

    import dataclasses
    if shape == "tiny":
        cfg = load_config("tiny")
    elif shape == "mid":
        cfg = load_config("tiny")
        cfg = dataclasses.replace(cfg, geometry=dataclasses.replace(type(cfg.geometry)(), grid_resolution=64))
    else:
        cfg = load_config("paper")
        cfg = dataclasses.replace(cfg, geometry=dataclasses.replace(cfg.geometry, grid_resolution=paper_grid))
    return build_dmtet_config(cfg), cfg


# ------------------------------------------------------------------------------------------------------
# process helpers
# ------------------------------------------------------------------------------------------------------
# ------------------------------------------------------------------------------------------------------
# prep: weights (diffusers save_pretrained) + LoRA file + host data for the guidance peer
# ------------------------------------------------------------------------------------------------------
def worker_prep(shape: str, root: Path) -> dict:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tsjax.diffusion import convert
    from tsjax.diffusion.lora import init_lora, save_lora_diffusers
    from tsjax.diffusion.sampling import TINY_SCHEDULER
    from tsjax.diffusion.schedulers import DDIMScheduler
    from tsjax.render.camera import make_cameras

    import jax

    ucfg, vcfg = model_configs(shape)
    torch.manual_seed(0)
    UNet2DConditionModel(**ucfg.to_diffusers()).save_pretrained(root / "unet")
    torch.manual_seed(1)
    AutoencoderKL(**vcfg.to_diffusers()).save_pretrained(root / "vae")
    _, up = convert.load_unet(root / "unet")
    save_lora_diffusers(root / "lora", init_lora(jax.random.key(12), up, LORA_RANK, None))

    # host-drawn data of the guidance peer (same for both frameworks)
    sc = SHAPES[shape]
    R, B, D = sc["res"], 1, int(ucfg.cross_attention_dim)
    f = 2 ** (len(vcfg.block_out_channels) - 1)
    h = R // f
    rng = np.random.default_rng(0)
    abar = np.asarray(DDIMScheduler.from_config(dict(TINY_SCHEDULER)).alphas_cumprod, np.float64)
    T1 = 999

    def trange(lo, hi):
        return rng.integers(int(np.ceil(lo * T1)), int(hi * T1) + 1, size=B)

    cams = make_cameras(np.array([15.0]), np.array([30.0]), 1.6, fovy=75.0)
    cam = np.asarray(cams.c2w, np.float32).reshape(B, 16)
    d = {"xc": rng.uniform(0, 1, (B, R, R, 3)), "xn": rng.uniform(0, 1, (B, R, R, 3)), "cam": cam,
         "cam_drop": cam * (rng.uniform(size=(B, 1)) > CAM_DROPOUT)}
    for k in ("cc", "crc", "crn", "unc", "lc", "ln"):
        d[k] = 0.5 * rng.standard_normal((B, L_SEQ, D))
    ts = {"c": trange(0.5, 0.75), "rc": trange(0.1, 0.25), "rn": trange(0.1, 0.25),
          "lc": rng.integers(0, 1000, size=B), "ln": rng.integers(0, 1000, size=B)}
    for k, t in ts.items():
        d["t_" + k] = t.astype(np.int64)
        d["eps_" + k] = rng.standard_normal((B, h, h, 4))
        d["sa_" + k] = np.sqrt(abar[t])
        d["s1_" + k] = np.sqrt(1.0 - abar[t])
        d["w_" + k] = 1.0 - abar[t]
    d = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in d.items()}
    np.savez(root / "peer_data.npz", **d)
    return {"unet_params_m": round(sum(p.numel() for p in UNet2DConditionModel.from_pretrained(root / "unet")
                                       .parameters()) / 1e6, 2)}


# ------------------------------------------------------------------------------------------------------
# the full stage-2 step (tsjax)
# ------------------------------------------------------------------------------------------------------
#: Step variants: PLAIN_PERF, PerfConfig() and PerfConfig() with a Winograd conv algorithm.
VARIANTS = ("plain", "optimised") + tuple(a for a in CONV_ALGORITHMS if a != "direct")


def build_step(shape: str, variant: str, root: Path | None, paper_grid: int, abstract: bool):
    """Everything the step needs: ``(spec, opt, state, inputs, key)``; with ``abstract`` every array is a
    ``jax.ShapeDtypeStruct`` (nothing allocated; the paper shape)."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsjax.config import PLAIN_PERF, PerfConfig, RegularizerConfig, CameraConfig, OptimConfig
    from tsjax.diffusion import convert
    from tsjax.diffusion.clip_text import CLIPTextConfig
    from tsjax.diffusion.sampling import TINY_SCHEDULER, DiffusionModel
    from tsjax.geometry.dmtet import fit_sdf, init as dm_init, sphere_sdf
    from tsjax.geometry.tets import TetGrid, build_tet_grid
    from tsjax.guidance.dsd import DSDSettings, PriorPrompts
    from tsjax.guidance.vsd import Denoiser
    from tsjax.metrics.vgg import VGG
    from tsjax.render.camera import make_cameras
    from tsjax.theme import stage2 as S
    from tsjax.theme.pipeline import _lora_parts

    sc = SHAPES[shape]
    R, K, n_ctx = sc["res"], sc["K"], N_CTX[shape]
    if variant == "plain":
        perf = PLAIN_PERF
    else:
        perf = PerfConfig(conv_algorithm="direct" if variant == "optimised" else variant)
    ucfg, vcfg = model_configs(shape)
    model = DiffusionModel(ucfg, vcfg, CLIPTextConfig.tiny(), dict(TINY_SCHEDULER), None, {})
    key = jax.random.key(0)
    SDS = jax.ShapeDtypeStruct
    if abstract:
        up = jax.eval_shape(lambda k: model.unet.init(k, jnp.zeros((1, ucfg.sample_size, ucfg.sample_size, 4)),
                                                      jnp.zeros((1,), jnp.int32), jnp.zeros((1, L_SEQ, ucfg.cross_attention_dim)),
                                                      jnp.zeros((1, 16)))["params"], key)
        vp = jax.eval_shape(lambda k: model.vae.init(k, jnp.zeros((1, R, R, 3)))["params"], key)
        ups = [up, up, up]
    else:
        ups = [convert.load_unet(root / "unet")[1] for _ in range(3)]  # concept, reference, LoRA base
        vp = convert.load_vae(root / "vae")[1]
    fast = S.with_compute(model, perf)
    lora_train, lora_apply = _lora_parts(fast, ups[2], LORA_RANK, jax.random.fold_in(key, 12))
    unet_apply = lambda p, x, t, c, cam: fast.unet_apply(p, x, t, c, cam)  # noqa: E731
    D = int(ucfg.cross_attention_dim)
    if abstract:
        tbl = lambda i: SDS((4, L_SEQ, D), jnp.float32)  # noqa: E731
        unc = SDS((L_SEQ, D), jnp.float32)
    else:
        tbl = lambda i: 0.5 * jax.random.normal(jax.random.key(100 + i), (4, L_SEQ, D))  # noqa: E731
        unc = 0.5 * jax.random.normal(jax.random.key(99), (L_SEQ, D))
    concept = PriorPrompts(Denoiser(unet_apply, ups[0]), tbl(0), None, unc)
    reference = PriorPrompts(Denoiser(unet_apply, ups[1]), tbl(1), tbl(2), unc)
    dm, cfg = geometry_config(shape, paper_grid)
    # contextual features
    if sc["features"] == "patch":
        features, feat_params = S.patch_features, None
    else:
        vgg = VGG(arch="vgg19", taps=("relu3_4",))
        init_v = lambda k: vgg.init(k, jnp.zeros((1, 32, 32, 3)))  # noqa: E731
        feat_params = jax.eval_shape(init_v, key) if abstract else init_v(jax.random.key(7))
        features = lambda p, x: vgg.apply(p, x)["relu3_4"]  # noqa: E731
    ccams = make_cameras(np.zeros(n_ctx), np.linspace(-180, 180, n_ctx, endpoint=False), 1.6, fovy=70.0)
    if abstract:
        N = dm.grid_resolution
        grid = TetGrid(verts=SDS(((N + 1) ** 3, 3), jnp.float32), tets=SDS((6 * N ** 3, 4), jnp.int32),
                       edges=SDS((3 * N * (N + 1) ** 2 + 3 * N * N * (N + 1) + N ** 3, 2), jnp.int32),
                       tet_edges=SDS((6 * N ** 3, 6), jnp.int32), resolution=N, scale=dm.grid_scale)
        ctx_feats = jax.eval_shape(features, feat_params, SDS((n_ctx, R, R, 3), jnp.float32))
        c2w = proj = SDS((n_ctx, 4, 4), jnp.float32)
    else:
        grid = build_tet_grid(dm.grid_resolution, scale=dm.grid_scale)
        targets = jax.random.uniform(jax.random.key(5), (n_ctx, R, R, 3))
        ctx_feats = jax.jit(features)(feat_params, targets)
        c2w, proj = ccams.c2w, ccams.proj
    g = cfg.guidance
    spec = S.Stage2Spec(
        dmtet=dm, resolution=R, batch_size=1, context_views=K, contextual_weight=g.contextual_weight,
        dsd=DSDSettings(concept_t=g.high_t, reference_t=g.low_t, alpha=ALPHA, beta=BETA,
                        guidance_scale=sc["guidance_scale"], camera_dropout=CAM_DROPOUT),
        reg=RegularizerConfig(), camera=CameraConfig(), vae_encode=fast.vae_encode,
        scaling_factor=model.scaling_factor, lora_apply=lora_apply, scheduler=model.scheduler, features=features,
        perf=perf)
    inputs = S.Stage2Inputs(grid=grid, vae=vp, concept=concept, reference=reference, lora_base=ups[2],
                            lora_color=tbl(3), lora_normal=tbl(4), context_feats=ctx_feats, context_c2w=c2w,
                            context_proj=proj, feature_params=feat_params)
    opt = S.make_optimizer(OptimConfig(lr_geometry_encoding=1e-2, lr_geometry_mlp=1e-3, lr_material=1e-2),
                           sc["lora_lr"])
    bg = S.init_background(jax.random.key(3))
    if abstract:
        state = jax.eval_shape(lambda k, lt: S.init_state(dm_init(k, dm), bg, lt, opt), key, lora_train)
    else:
        inputs = S.prepare_inputs(inputs, perf)
        geo = fit_sdf(dm_init(jax.random.key(0), dm), dm, sphere_sdf(0.3), jax.random.key(1), steps=60,
                      n_points=4000, batch=2000, step=None)
        state = S.init_state(geo, bg, lora_train, opt)
    return spec, opt, state, inputs, key


def step_programs(spec, opt):
    """The step as ``(programs, call)``: ``programs`` = list of ``(name, jitted fn)`` that make up the step
    (one for the fused variant, three for the split one, built as :func:`tsjax.theme.stage2.make_step`
    builds them), ``call(compiled, state, inputs, key) -> (state, metrics)`` composes compiled programs."""
    import jax

    from tsjax.theme import stage2 as S

    perf = spec.perf
    if perf.fuse_contextual or spec.context_views == 0:
        f = S.make_step(spec, opt)  # the jitted fused step itself
        return [("step", f, lambda st, inp, k: (st, inp, k))], lambda c, st, inp, k: c[0](st, inp, k)
    gm, gc, upd = S.make_split_parts(spec, opt)

    def upd_args(st, inp, k):
        grads, m = jax.eval_shape(gm, st.params, st.step, inp, k)
        return st, grads, m

    progs = [("grad_main", gm, lambda st, inp, k: (st.params, st.step, inp, k)),
             ("grad_ctx", gc, lambda st, inp, k: (st.params, st.step, inp, k)),
             ("update", upd, upd_args)]

    def call(c, st, inp, k):
        args = (st.params, st.step, inp, k)
        return c[2](st, *S.combine_split(*c[0](*args), *c[1](*args)))

    return progs, call


FLOPS_SOURCE = "lowered HLO on the XLA paths (native CPU kernels off), pre-optimisation"
_NATIVE_SWITCHES = ("TSJAX_NATIVE_CONV", "TSJAX_NATIVE_ATTENTION", "TSJAX_NATIVE_GROUP_NORM", "TSJAX_NATIVE_DENSE",
                    "TSJAX_NATIVE_GEGLU", "TSJAX_NATIVE_LAYER_NORM")


def xla_path_flops(fn, args) -> float:
    """XLA's FLOP count of ``fn(*args)`` (a ``jax.jit`` function) traced with tsjax's native CPU kernels
    off: the same computation on XLA's own conv/attention/GroupNorm/dot ops, whose FLOPs XLA can count (the
    native kernels are FFI custom calls, which ``cost_analysis()`` counts as 0). Pre-optimisation HLO of
    a fresh trace (a new wrapper, so no cached trace with the custom calls is reused); lowering only."""
    import os

    import jax

    saved = {k: os.environ.get(k) for k in _NATIVE_SWITCHES}
    os.environ.update({k: "0" for k in _NATIVE_SWITCHES})
    try:
        inner = getattr(fn, "__wrapped__", fn)
        ca = jax.jit(lambda *a: inner(*a)).lower(*args).cost_analysis()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return float(ca.get("flops", 0.0))


def compile_programs(progs, state, inputs, key):
    """AOT-compile every program: ``(compiled list, lower_s, compile_s, flops, memory dict)``."""
    compiled, lower_s, compile_s, flops = [], 0.0, 0.0, 0.0
    mem = {"argument_mb": 0.0, "output_mb": 0.0, "temp_mb": 0.0, "alias_mb": 0.0}
    for _, fn, args in progs:
        t0 = time.perf_counter()
        lowered = fn.lower(*args(state, inputs, key))
        t1 = time.perf_counter()
        c = lowered.compile()
        t2 = time.perf_counter()
        lower_s += t1 - t0
        compile_s += t2 - t1
        flops += xla_path_flops(fn, args(state, inputs, key))
        try:
            ma = c.memory_analysis()
            mem["argument_mb"] += ma.argument_size_in_bytes / 2**20
            mem["output_mb"] += ma.output_size_in_bytes / 2**20
            mem["alias_mb"] += ma.alias_size_in_bytes / 2**20
            mem["temp_mb"] = max(mem["temp_mb"], ma.temp_size_in_bytes / 2**20)
        except Exception:  # noqa: BLE001 - memory analysis is optional per backend
            pass
        compiled.append(c)
    return compiled, lower_s, compile_s, flops, {k: round(v, 1) for k, v in mem.items()}


def worker_step(shape: str, variant: str, root: Path, paper_grid: int) -> None:
    import jax

    spec, opt, state, inputs, key = build_step(shape, variant, root, paper_grid, abstract=False)
    progs, call = step_programs(spec, opt)
    compiled, lower_s, compile_s, flops, mem = compile_programs(progs, state, inputs, key)
    reset_ok = reset_peak()
    rss0 = status_mb("VmRSS")
    t0 = time.perf_counter()
    state, m = call(compiled, state, inputs, key)
    jax.block_until_ready((state, m))
    first = time.perf_counter() - t0
    m0 = {k: float(v) for k, v in jax.device_get(m).items()}
    state, m = call(compiled, state, inputs, key)  # warm-up
    jax.block_until_ready((state, m))
    emit_result({"lower_s": lower_s, "compile_s": compile_s, "first_call_s": first, "flops": flops,
                 "xla_memory": mem, "programs": len(progs), "num_faces": m0["num_faces"],
                 "finite": m0["finite"], "loss": m0["loss"]})
    cur = {"state": state, "m": m}

    def step():
        cur["state"], cur["m"] = jax.block_until_ready(call(compiled, cur["state"], inputs, key))

    serve(step, rss0, reset_ok, lambda: {"finite_last": float(cur["m"]["finite"])})


def worker_paper(variant: str, paper_grid: int, do_compile: bool) -> None:
    """Paper shape from shapes only: lower (+ compile) every program; FLOPs and XLA's memory analysis."""
    import jax

    spec, opt, state, inputs, key = build_step("paper", variant, None, paper_grid, abstract=True)
    progs, _ = step_programs(spec, opt)
    rec = {"programs": len(progs)}
    if not do_compile:
        flops, lower_s = 0.0, 0.0
        for _, fn, args in progs:
            t0 = time.perf_counter()
            lw = fn.lower(*args(state, inputs, key))
            lower_s += time.perf_counter() - t0
            flops += xla_path_flops(fn, args(state, inputs, key))
        rec.update(lower_s=lower_s, flops=flops, flops_source=FLOPS_SOURCE)
    else:
        _, lower_s, compile_s, flops, mem = compile_programs(progs, state, inputs, key)
        rec.update(lower_s=lower_s, compile_s=compile_s, flops=flops, xla_memory=mem,
                   flops_source=FLOPS_SOURCE)
    rec["param_count_unet_m"] = round(sum(x.size for x in jax.tree_util.tree_leaves(inputs.lora_base)) / 1e6, 1)
    emit_result(rec)


# ------------------------------------------------------------------------------------------------------
# guidance peer: tsjax
# ------------------------------------------------------------------------------------------------------
def worker_guid_tsjax(shape: str, root: Path, dtype: str, algo: str = "direct") -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    from tsjax.config import OptimConfig, PerfConfig
    from tsjax.diffusion import convert
    from tsjax.diffusion.clip_text import CLIPTextConfig
    from tsjax.diffusion.lora import LORA_WEIGHT_NAME, load_lora_diffusers
    from tsjax.diffusion.sampling import TINY_SCHEDULER, DiffusionModel
    from tsjax.ops import conv as conv_ops
    from tsjax.theme import stage2 as S
    from tsjax.theme.pipeline import _lora_parts

    sc = SHAPES[shape]
    gs = sc["guidance_scale"]
    ucfg, up = convert.load_unet(root / "unet")
    up_c, up_r = convert.load_unet(root / "unet")[1], convert.load_unet(root / "unet")[1]
    vcfg, vp = convert.load_vae(root / "vae")
    model = S.with_compute(DiffusionModel(ucfg, vcfg, CLIPTextConfig.tiny(), dict(TINY_SCHEDULER), None, {}),
                           PerfConfig(compute_dtype=dtype))
    train, lora_apply = _lora_parts(model, up, LORA_RANK, jax.random.key(12))
    train["lora"] = load_lora_diffusers(root / "lora" / LORA_WEIGHT_NAME, up)
    sf = float(model.scaling_factor)
    oc = OptimConfig()
    opt = optax.adamw(sc["lora_lr"], b1=oc.b1, b2=oc.b2, eps=oc.eps, weight_decay=oc.weight_decay)
    opt_state = opt.init(train)
    data = {k: jnp.asarray(v.astype(np.int32) if v.dtype == np.int64 else v)
            for k, v in np.load(root / "peer_data.npz").items()}
    frozen = {"vae": vp, "concept": up_c, "ref": up_r, "lora_base": up}
    # As the stage-2 step does (S.prepare_inputs): frozen weights stored once in the compute dtype, so a
    # bf16 step does not cast them on every call (PyTorch's autocast peer does: it has no such store).
    frozen = S.cast_floating(frozen, S.resolve_dtype(PerfConfig(compute_dtype=dtype)))
    sg = jax.lax.stop_gradient
    cat = lambda xs: jnp.concatenate(xs, 0)  # noqa: E731

    def loss_fn(tr, xc, xn, fz, d):
        zc = model.vae_encode(fz["vae"], xc * 2.0 - 1.0)[0].astype(jnp.float32) * sf
        zn = model.vae_encode(fz["vae"], xn * 2.0 - 1.0)[0].astype(jnp.float32) * sf
        z = {"c": zc, "rc": zc, "rn": zn}
        xt = {k: d["sa_" + k][:, None, None, None] * sg(z[k]) + d["s1_" + k][:, None, None, None] * d["eps_" + k]
              for k in z}
        cam = d["cam"]
        o = model.unet_apply(fz["ref"], cat([xt["rc"], xt["rc"], xt["rn"], xt["rn"]]),
                             cat([d["t_rc"], d["t_rc"], d["t_rn"], d["t_rn"]]),
                             cat([d["unc"], d["crc"], d["unc"], d["crn"]]), cat([cam] * 4))
        u1, c1, u2, c2 = jnp.split(o, 4)
        o = model.unet_apply(fz["concept"], cat([xt["c"], xt["c"]]), cat([d["t_c"], d["t_c"]]),
                             cat([d["unc"], d["cc"]]), cat([cam] * 2))
        u0, c0 = jnp.split(o, 2)
        prior = {"c": u0 + gs * (c0 - u0), "rc": u1 + gs * (c1 - u1), "rn": u2 + gs * (c2 - u2)}
        lo = lora_apply({"base": fz["lora_base"], "train": sg(tr)}, cat([xt["c"], xt["rc"], xt["rn"]]),
                        cat([d["t_c"], d["t_rc"], d["t_rn"]]), cat([d["lc"], d["lc"], d["ln"]]), cat([cam] * 3))
        lora_out = dict(zip(("c", "rc", "rn"), jnp.split(sg(lo), 3)))
        terms = {}
        for k in ("c", "rc", "rn"):
            g = d["w_" + k][:, None, None, None] * (prior[k] - lora_out[k])
            terms[k] = 0.5 * jnp.sum(jnp.square(z[k] - sg(z[k] - g))) / z[k].shape[0]
        xl = {k: d["sa_" + k][:, None, None, None] * sg(zz) + d["s1_" + k][:, None, None, None] * d["eps_" + k]
              for k, zz in (("lc", zc), ("ln", zn))}
        pred = lora_apply({"base": fz["lora_base"], "train": tr}, cat([xl["lc"], xl["ln"]]),
                          cat([d["t_lc"], d["t_ln"]]), cat([d["lc"], d["ln"]]), cat([d["cam_drop"]] * 2))
        pc, pn = jnp.split(pred, 2)
        l_lora = 0.5 * (jnp.mean(jnp.square(pc - d["eps_lc"])) + jnp.mean(jnp.square(pn - d["eps_ln"])))
        total = ALPHA * terms["c"] + BETA * (terms["rc"] + terms["rn"]) + l_lora
        return total, dict(terms, lora=l_lora)

    def step(tr, ost, fz, d):
        with conv_ops.algorithm(algo):  # as PerfConfig.conv_algorithm in the stage-2 step
            (total, terms), (g_tr, gxc, gxn) = jax.value_and_grad(loss_fn, argnums=(0, 1, 2), has_aux=True)(
                tr, d["xc"], d["xn"], fz, d)
        updates, ost = opt.update(g_tr, ost, tr)
        return optax.apply_updates(tr, updates), ost, total, terms, gxc, gxn

    f = jax.jit(step, donate_argnums=(0, 1))
    t0 = time.perf_counter()
    compiled = f.lower(train, opt_state, frozen, data).compile()
    compile_s = time.perf_counter() - t0
    flops = xla_path_flops(f, (train, opt_state, frozen, data))
    reset_ok = reset_peak()
    rss0 = status_mb("VmRSS")
    t0 = time.perf_counter()
    train, opt_state, total, terms, gxc, gxn = jax.block_until_ready(compiled(train, opt_state, frozen, data))
    first = time.perf_counter() - t0
    np.savez(root / f"parity_tsjax_{dtype}{_algo_suffix(algo)}.npz", total=np.asarray(total, np.float32),
             gxc=np.asarray(gxc, np.float32), gxn=np.asarray(gxn, np.float32),
             **{"term_" + k: np.asarray(v, np.float32) for k, v in terms.items()})
    train, opt_state = jax.block_until_ready(compiled(train, opt_state, frozen, data))[:2]  # warm-up
    emit_result({"compile_s": compile_s, "first_call_s": first, "flops": flops})
    cur = {"train": train, "opt_state": opt_state}

    def step():
        out = jax.block_until_ready(compiled(cur["train"], cur["opt_state"], frozen, data))
        cur["train"], cur["opt_state"] = out[:2]

    serve(step, rss0, reset_ok)


# ------------------------------------------------------------------------------------------------------
# guidance peer: diffusers PyTorch
# ------------------------------------------------------------------------------------------------------
def worker_guid_torch(shape: str, root: Path, threads: int, dtype: str) -> None:
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    from tsjax.config import OptimConfig
    from tsjax.diffusion.lora import LORA_WEIGHT_NAME

    torch.set_num_threads(threads)
    sc = SHAPES[shape]
    gs = sc["guidance_scale"]

    def unet():
        m = UNet2DConditionModel.from_pretrained(root / "unet").eval()
        m.requires_grad_(False)
        return m

    u_c, u_r, u_l = unet(), unet(), unet()
    u_l.load_lora_adapter(str(root / "lora" / LORA_WEIGHT_NAME), prefix="unet")
    trainable = []
    for n, p in u_l.named_parameters():
        p.requires_grad_("lora_" in n or n.startswith("class_embedding."))
        if p.requires_grad:
            trainable.append(p)
    vae = AutoencoderKL.from_pretrained(root / "vae").eval()
    vae.requires_grad_(False)
    sf = float(vae.config.scaling_factor)
    oc = OptimConfig()
    opt = torch.optim.AdamW(trainable, lr=sc["lora_lr"], betas=(oc.b1, oc.b2), eps=oc.eps,
                            weight_decay=oc.weight_decay)
    raw = dict(np.load(root / "peer_data.npz"))
    d = {}
    for k, v in raw.items():
        t = torch.from_numpy(v)
        if v.ndim == 4:  # NHWC -> NCHW
            t = t.permute(0, 3, 1, 2).contiguous()
        d[k] = t
    n_lora = sum(p.numel() for p in trainable)

    def bc(v):
        return v[:, None, None, None]

    def step():
        xc = d["xc"].clone().requires_grad_(True)
        xn = d["xn"].clone().requires_grad_(True)
        zc = vae.encode(xc * 2.0 - 1.0).latent_dist.mean * sf
        zn = vae.encode(xn * 2.0 - 1.0).latent_dist.mean * sf
        z = {"c": zc, "rc": zc, "rn": zn}
        xt = {k: bc(d["sa_" + k]) * z[k].detach() + bc(d["s1_" + k]) * d["eps_" + k] for k in z}
        cam = d["cam"]
        cat = torch.cat
        with torch.no_grad():
            o = u_r(cat([xt["rc"], xt["rc"], xt["rn"], xt["rn"]]), cat([d["t_rc"], d["t_rc"], d["t_rn"], d["t_rn"]]),
                    cat([d["unc"], d["crc"], d["unc"], d["crn"]]), class_labels=cat([cam] * 4)).sample
            u1, c1, u2, c2 = o.chunk(4)
            o = u_c(cat([xt["c"], xt["c"]]), cat([d["t_c"], d["t_c"]]), cat([d["unc"], d["cc"]]),
                    class_labels=cat([cam] * 2)).sample
            u0, c0 = o.chunk(2)
            prior = {"c": u0 + gs * (c0 - u0), "rc": u1 + gs * (c1 - u1), "rn": u2 + gs * (c2 - u2)}
            lo = u_l(cat([xt["c"], xt["rc"], xt["rn"]]), cat([d["t_c"], d["t_rc"], d["t_rn"]]),
                     cat([d["lc"], d["lc"], d["ln"]]), class_labels=cat([cam] * 3)).sample
            lora_out = dict(zip(("c", "rc", "rn"), lo.chunk(3)))
        terms = {}
        for k in ("c", "rc", "rn"):
            g = bc(d["w_" + k]) * (prior[k] - lora_out[k])
            terms[k] = 0.5 * ((z[k] - (z[k] - g).detach()) ** 2).sum() / z[k].shape[0]
        xl = {k: bc(d["sa_" + k]) * zz.detach() + bc(d["s1_" + k]) * d["eps_" + k] for k, zz in (("lc", zc), ("ln", zn))}
        pred = u_l(cat([xl["lc"], xl["ln"]]), cat([d["t_lc"], d["t_ln"]]), cat([d["lc"], d["ln"]]),
                   class_labels=cat([d["cam_drop"]] * 2)).sample
        pc, pn = pred.chunk(2)
        l_lora = 0.5 * (((pc - d["eps_lc"]) ** 2).mean() + ((pn - d["eps_ln"]) ** 2).mean())
        total = ALPHA * terms["c"] + BETA * (terms["rc"] + terms["rn"]) + l_lora
        opt.zero_grad(set_to_none=True)
        total.backward()
        opt.step()
        return total.detach(), {k: v.detach() for k, v in dict(terms, lora=l_lora).items()}, xc.grad, xn.grad

    if dtype == "bfloat16":  # autocast: bf16 matmuls/convs (oneDNN), float32 weights and reductions
        step_fp32 = step

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return step_fp32()

    reset_ok = reset_peak()
    rss0 = status_mb("VmRSS")
    t0 = time.perf_counter()
    total, terms, gxc, gxn = step()
    first = time.perf_counter() - t0
    np.savez(root / f"parity_torch_{dtype}.npz", total=total.float().numpy(),
             gxc=gxc.float().permute(0, 2, 3, 1).numpy(), gxn=gxn.float().permute(0, 2, 3, 1).numpy(),
             **{"term_" + k: v.float().numpy() for k, v in terms.items()})
    step()  # warm-up
    t0 = time.perf_counter()
    step()
    steady = time.perf_counter() - t0
    emit_result({"compile_s": max(first - steady, 0.0), "first_call_s": first, "trainable_params": n_lora,
                 "torch_threads": torch.get_num_threads()})
    serve(step, rss0, reset_ok)


# ------------------------------------------------------------------------------------------------------
# peak matmul rate (the utilisation denominator)
# ------------------------------------------------------------------------------------------------------
def worker_peak(threads: int) -> None:
    import jax
    import jax.numpy as jnp
    import torch

    n = 2048
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    f = jax.jit(lambda x: x @ x)
    jax.block_until_ready(f(a))
    best = min(_timed(lambda: jax.block_until_ready(f(a))) for _ in range(5))
    torch.set_num_threads(threads)
    ta = torch.randn(n, n)
    ta @ ta
    tbest = min(_timed(lambda: ta @ ta) for _ in range(5))
    emit_result({"jax_matmul_gflops": 2 * n**3 / best / 1e9, "torch_matmul_gflops": 2 * n**3 / tbest / 1e9,
                 "matmul_n": n})


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _algo_suffix(algo: str, sep: str = "_") -> str:
    """Suffix of a tsjax guidance worker's parity file (``sep="_"``) or name (``sep=":"``) for conv
    algorithm ``algo``: empty for ``direct``, so the direct worker keeps its earlier names."""
    return "" if algo == "direct" else f"{sep}{algo}"


def run_worker(argv: list[str]) -> None:
    role = argv[0]
    if role == "prep":
        emit_result(worker_prep(argv[1], Path(argv[2])))
    elif role == "step":
        worker_step(argv[1], argv[2], Path(argv[3]), int(argv[4]))
    elif role == "paper":
        worker_paper(argv[1], int(argv[2]), argv[3] == "1")
    elif role == "guid_tsjax":
        worker_guid_tsjax(argv[1], Path(argv[2]), argv[3], argv[4] if len(argv) > 4 else "direct")
    elif role == "guid_torch":
        worker_guid_torch(argv[1], Path(argv[2]), int(argv[3]), argv[4])
    elif role == "peak":
        worker_peak(int(argv[1]))
    else:
        raise SystemExit(f"unknown worker role {role}")


# ------------------------------------------------------------------------------------------------------
# parent: spawn workers, interleave, summarise
# ------------------------------------------------------------------------------------------------------
def _machine() -> dict:
    import jax
    import torch

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"machine": f"CPU {cpu}, {os.cpu_count()} cores, {round(_meminfo_total_gb())} GiB",
            "python": platform.python_version(), "jax": jax.__version__, "torch": torch.__version__}


def _meminfo_total_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 1024.0**2
    return float("nan")


def _rel(a, b) -> float:
    import numpy as np

    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--worker":
        run_worker(argv[1:])
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shapes", default="tiny,mid", help="comma list of tiny, mid, paper")
    ap.add_argument("--variants", default="plain,optimised",
                    help="comma list of plain, optimised, winograd2, winograd4 (optimised + that conv algorithm)")
    ap.add_argument("--peer", action="store_true", help="also time the guidance part in tsjax and diffusers PyTorch")
    ap.add_argument("--peer-dtypes", default="float32",
                    help="comma list of float32, bfloat16: compute dtype of the guidance peers (bfloat16: tsjax "
                         "perf.compute_dtype=bfloat16 against PyTorch bf16 autocast and PyTorch float32)")
    ap.add_argument("--peer-conv", default="direct",
                    help="comma list of direct, winograd2, winograd4: conv algorithms of the tsjax guidance peer "
                         "(PerfConfig.conv_algorithm; float32 3x3 convs), one worker each")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (after one warm-up)")
    ap.add_argument("--threads", type=int, default=2, help="CPU threads for XLA and torch")
    ap.add_argument("--paper-grid", type=int, default=128, help="tet grid of the paper shape")
    ap.add_argument("--paper-compile", type=int, default=1, help="1: compile the paper shape, 0: lower only")
    ap.add_argument("--out", default=None, help="append the JSON lines here (default bench/results/"
                                                 "dsd_step_cpu_<date>.jsonl)")
    args = ap.parse_args(argv)
    shapes = [s for s in args.shapes.split(",") if s]
    variants = [v for v in args.variants.split(",") if v]
    peer_dtypes = [t for t in args.peer_dtypes.split(",") if t]
    peer_convs = [a for a in args.peer_conv.split(",") if a]
    bad = [s for s in shapes if s not in SHAPES] + [v for v in variants if v not in VARIANTS] + \
        [t for t in peer_dtypes if t not in ("float32", "bfloat16")] + \
        [a for a in peer_convs if a not in CONV_ALGORITHMS]
    if bad or args.steps < 1 or args.threads < 1:
        print(f"error: --shapes/--variants: unknown {bad}" if bad else "error: --steps and --threads must be >= 1",
              file=sys.stderr)
        return 2
    date = datetime.date.today().isoformat()
    out = Path(args.out) if args.out else HERE / "results" / f"dsd_step_cpu_{date}.jsonl"
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}").strip()
    env["OMP_NUM_THREADS"] = str(args.threads)
    env = worker_env(env, args.threads)  # CPU affinity: XLA ignores thread counts for GEMMs
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    lines: list[str] = []

    def emit(rec: dict) -> None:
        line = json.dumps(rec)
        print(line, flush=True)
        lines.append(line)

    meta = dict(_machine(), date=date, threads=args.threads, cpus_pinned_per_worker=args.threads)
    logdir = Path(tempfile.mkdtemp(prefix="dsd_bench_logs_"))
    script = Path(__file__).resolve()
    peak_w = Worker(script, "peak", ["peak", str(args.threads)], env, logdir)
    peak = peak_w.read()
    peak_w.close()
    emit(dict(meta, kind="peak", **peak))
    peak_gflops = peak["jax_matmul_gflops"]

    for shape in shapes:
        sc = SHAPES[shape]
        base = dict(shape=shape, resolution=sc["res"], grid=args.paper_grid if shape == "paper" else sc["grid"],
                    batch=1, context_views=sc["K"], contextual_features=sc["features"], **meta)
        avail = available_gb()
        if avail < sc["need_gb"]:
            emit(dict(base, kind="skipped", reason=f"needs ~{sc['need_gb']} GB free, {avail:.1f} GB available"))
            continue
        if shape == "paper":
            for v in variants:
                w = Worker(script, f"paper:{v}", ["paper", v, str(args.paper_grid), str(args.paper_compile)], env,
                           logdir)
                try:
                    r = w.read()
                    emit(dict(base, kind="step", variant=v, run="not run: memory/time (CPU, 24 GiB shared)",
                              compile_s=round(r["compile_s"], 2) if "compile_s" in r else None, lower_s=round(r["lower_s"], 2),
                              gflop_per_step=round(r["flops"] / 1e9, 1), flops_source=r["flops_source"],
                              xla_memory=r.get("xla_memory"), programs=r["programs"],
                              unet_params_m=r["param_count_unet_m"]))
                except RuntimeError as e:
                    emit(dict(base, kind="step", variant=v, error=str(e)))
                finally:
                    w.close()
            continue
        with tempfile.TemporaryDirectory(prefix=f"dsd_bench_{shape}_") as d:
            root = Path(d)
            pw = Worker(script, f"prep:{shape}", ["prep", shape, d], env, logdir)
            prep = pw.read()
            pw.close()
            setup: dict[str, dict] = {}
            times: dict[str, list[float]] = {}
            fin: dict[str, dict] = {}
            load_of: dict[str, dict] = {}
            phases = [[(f"step:{v}", ["step", shape, v, d, str(args.paper_grid)]) for v in variants]]
            if args.peer:
                for dt in peer_dtypes:  # bf16: against PyTorch bf16 autocast and PyTorch float32
                    torch_dts = [dt] + (["float32"] if dt != "float32" else [])
                    phases.append([(f"guid:tsjax:{dt}{_algo_suffix(a, ':')}",
                                    ["guid_tsjax", shape, d, dt, a]) for a in peer_convs] +
                                  [(f"guid:torch:{t}", ["guid_torch", shape, d, str(args.threads), t])
                                   for t in torch_dts])
            # one phase at a time (the step variants, then the guidance peers of each dtype) so that at most
            # two or three workers hold memory
            for roles in phases:
                workers: dict[str, Worker] = {}
                for name, wargv in roles:  # start + compile one at a time (no two compiles competing)
                    w = Worker(script, f"{name}:{shape}", wargv, env, logdir)
                    try:
                        setup[name] = w.read()
                        workers[name] = w
                    except RuntimeError as e:
                        emit(dict(base, kind="error", role=name, error=str(e)))
                        w.close()
                loads = [os.getloadavg()[0]]
                times.update(interleave(workers, args.steps, lambda: loads.append(os.getloadavg()[0])))
                for n, w in workers.items():
                    fin[n] = w.ask("finish")
                    w.close()
                    load_of[n] = {"load_min": round(min(loads), 2), "load_max": round(max(loads), 2)}
            for n in times:
                ts = times[n]
                s, f = setup[n], fin[n]
                rec = dict(base, kind="step" if n.startswith("step") else "guidance", steps=len(ts),
                           step_ms_min=round(1e3 * min(ts), 1), step_ms_median=round(1e3 * statistics.median(ts), 1),
                           compile_s=round(s["compile_s"], 2), first_call_s=round(s["first_call_s"], 2),
                           peak_rss_mb=f["peak_rss_mb"], step_mem_mb=f["step_mem_mb"], **load_of[n])
                if n.startswith("step"):
                    rec.update(variant=n.split(":")[1], programs=s["programs"], num_faces=s["num_faces"],
                               finite=min(s["finite"], f["finite_last"]), xla_memory=s["xla_memory"])
                else:
                    rec.update(framework=n.split(":")[1], dtype=n.split(":")[2])
                    if rec["framework"] == "tsjax":
                        rec.update(conv_algorithm=n.split(":")[3] if n.count(":") > 2 else "direct")
                if "flops" in s:
                    gf = s["flops"] / 1e9
                    rec.update(gflop_per_step=round(gf, 2), flops_source=FLOPS_SOURCE,
                               peak_gflops_assumed=round(peak_gflops, 1),
                               utilisation=round(gf / (statistics.median(ts)) / peak_gflops, 4))
                if n.startswith("guid:torch"):
                    rec.update(torch_threads=s["torch_threads"], trainable_params=s["trainable_params"],
                               compile_s_note="eager: first call minus a steady call")
                rec["unet_params_m"] = prep["unet_params_m"]
                emit(rec)
            for dt, algo in [(t, a) for t in peer_dtypes for a in peer_convs] if args.peer else []:
                for tdt in [dt] + (["float32"] if dt != "float32" else []):
                    a_n, b_n = f"guid:tsjax:{dt}{_algo_suffix(algo, ':')}", f"guid:torch:{tdt}"
                    if a_n not in times or b_n not in times:
                        continue
                    import numpy as np

                    pa = np.load(root / f"parity_tsjax_{dt}{_algo_suffix(algo)}.npz")
                    pb = np.load(root / f"parity_torch_{tdt}.npz")
                    emit(dict(base, kind="peer_ratio", tsjax_dtype=dt, torch_dtype=tdt, conv_algorithm=algo,
                              goal="<= 0.7 at mid",
                              **ratio_summary(times[a_n], times[b_n]),
                              parity_rel_err={"loss": _rel(pa["total"], pb["total"]),
                                              "grad_color_image": _rel(pa["gxc"], pb["gxc"]),
                                              "grad_normal_image": _rel(pa["gxn"], pb["gxn"]),
                                              **{k: _rel(pa[k], pb[k]) for k in pa.files if k.startswith("term_")}},
                              **load_of[b_n]))
            if "step:plain" in times and "step:optimised" in times:
                p, o = times["step:plain"], times["step:optimised"]
                emit(dict(base, kind="speedup", plain_over_optimised_median=round(statistics.median(p) /
                                                                                   statistics.median(o), 3),
                          plain_over_optimised_min=round(min(p) / min(o), 3), **load_of["step:plain"]))
            for v in VARIANTS[2:]:  # the Winograd variants
                if f"step:{v}" not in times:
                    continue
                wt = times[f"step:{v}"]
                rec = dict(base, kind="speedup", variant=v, **load_of[f"step:{v}"])
                for ref in ("plain", "optimised"):
                    if f"step:{ref}" in times:
                        rt = times[f"step:{ref}"]
                        rec[f"{ref}_over_{v}_median"] = round(statistics.median(rt) / statistics.median(wt), 3)
                        rec[f"{ref}_over_{v}_min"] = round(min(rt) / min(wt), 3)
                emit(rec)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {out} (worker logs in {logdir})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
