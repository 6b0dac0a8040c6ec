"""Stage-2 throughput across devices (issue 7): assets/hour of the sharded stage-2 loop at 1, 2, 4 devices.

    python bench/scaling.py [--devices 1,2,4] [--assets-per-device 1] [--steps 8] [--run-steps 300]
                            [--out FILE]

Each device count N runs in its own process (the device count of a CPU is fixed when jax starts:
``XLA_FLAGS=--xla_force_host_platform_device_count=N``; on a GPU/TPU host the N first devices are used).
The process builds K = N * assets-per-device assets with the SAME per-asset work at every N (tiny shapes:
a one-level camera-conditioned UNet as concept prior, reference prior and LoRA base, a strided-conv VAE
encoder, 32 px renders, B = 1 distilled view + 2 contextual views per step, tet grid 12 fitted to a sphere,
the rasterizer backend ``auto``, i.e. the native FFI kernel on CPU) and runs the real stage-2 step
(:func:`tsjax.theme.stage2.make_sharded_step`, K assets over the ``asset`` mesh axis), exactly as
``python -m tsjax.optimize --devices N`` does. Every asset has its own concept-prior weights, contextual
targets, initial state and key.

Reported per N (one JSON line each, stdout, appended to ``--out``, default
``bench/results/scaling_<platform>_<date>.jsonl``): ``compile_s`` (first call minus a steady step: trace +
XLA compile), ``step_s_median`` / ``step_s_min`` over ``--steps`` calls after the first, and
``assets_per_hour = K * 3600 / (step_s_median * run_steps)`` for a stage-2 loop of ``--run-steps`` steps
per asset (compile excluded; ``assets_per_hour_with_compile`` includes one compilation), plus
``speedup_vs_1`` (assets/hour relative to N = 1) in a final summary line. At N = 1 the single-asset step
(:func:`tsjax.theme.stage2.make_step`, what ``--devices 1`` runs) is timed too (``single_step_s_median``).

On a CPU, forced host "devices" are not hardware: they share the process's cores, so N > cores cannot
scale, and even N <= cores only shows how well XLA runs the N device programs in parallel on the shared
thread pool. The figure to quote for real scaling is from a multi-GPU host.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

RES, L, CTX = 32, 6, 16


def _setup(k_assets: int):
    """``(spec, optimizer, assets)`` with ``assets[k] = (inputs, state, key)`` (tiny shapes, see above)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp
    import numpy as np

    from tsjax.config import CameraConfig, OptimConfig, RegularizerConfig
    from tsjax.diffusion.sampling import TINY_SCHEDULER
    from tsjax.diffusion.schedulers import DDIMScheduler
    from tsjax.diffusion.unet import UNet2DConditionModel, UNetConfig
    from tsjax.geometry.dmtet import DMTetConfig, fit_sdf, init, sphere_sdf
    from tsjax.geometry.hashgrid import HashGridConfig
    from tsjax.geometry.tets import build_tet_grid
    from tsjax.guidance.dsd import DSDSettings, PriorPrompts
    from tsjax.guidance.vsd import Denoiser
    from tsjax.render.camera import make_cameras
    from tsjax.theme import stage2 as s2

    class VAEEncoder(nn.Module):
        @nn.compact
        def __call__(self, x):
            h = nn.silu(nn.Conv(16, (3, 3), (2, 2))(x))
            h = nn.Conv(8, (3, 3), (2, 2))(h)
            return h[..., :4], h[..., 4:]

    ucfg = UNetConfig.tiny(camera_embed_dim=16, cross_attention_dim=CTX, sample_size=RES // 4,
                           block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                           up_block_types=("CrossAttnUpBlock2D",), attention_head_dim=(4,))
    unet, vae = UNet2DConditionModel(ucfg), VAEEncoder()
    apply = lambda p, x, t, c, cam: unet.apply({"params": p}, x, t, c, cam)  # noqa: E731

    def lora_apply(p, x, t, c, cam):  # trainable camera embedding + output offset on the frozen base
        prm = dict(p["base"], camera_embedding=p["train"]["camera_embedding"])
        return unet.apply({"params": prm}, x, t, c, cam) + p["train"]["delta"]

    tbl = lambda k: 0.5 * jax.random.normal(jax.random.key(k), (4, L, CTX))  # noqa: E731
    hg = HashGridConfig(n_levels=4, n_features=2, log2_table_size=12, base_resolution=4, per_level_scale=1.5)
    dm = DMTetConfig(grid_resolution=12, max_faces=4000, sdf_grid=hg, material_grid=hg, sdf_hidden=16,
                     material_hidden=16, progressive_update_steps=0)
    grid = build_tet_grid(12, cache=False)
    geo0 = fit_sdf(init(jax.random.key(0), dm), dm, sphere_sdf(0.3), jax.random.key(1), steps=30, n_points=2000,
                   batch=2000, step=None)
    spec = s2.Stage2Spec(dmtet=dm, resolution=RES, batch_size=1, context_views=2, contextual_weight=1.0,
                         dsd=DSDSettings(guidance_scale=3.0), reg=RegularizerConfig(), camera=CameraConfig(),
                         vae_encode=lambda p, x: vae.apply({"params": p}, x), scaling_factor=0.5,
                         lora_apply=lora_apply, scheduler=DDIMScheduler.from_config(TINY_SCHEDULER),
                         features=s2.patch_features, backend="auto")
    opt = s2.make_optimizer(OptimConfig(), 1e-3)
    ref_p, base_p = unet.init_params(jax.random.key(1), seq_len=L), unet.init_params(jax.random.key(2), seq_len=L)
    vp = vae.init(jax.random.key(9), jnp.zeros((1, RES, RES, 3)))["params"]
    reference = PriorPrompts(Denoiser(apply, ref_p), tbl(20), tbl(21), jnp.zeros((L, CTX)))
    assets = []
    for k in range(k_assets):
        cams = make_cameras(np.full(4, 5.0 * k), np.linspace(-180, 90, 4) + 10.0 * k, 1.6, fovy=70.0)
        targets = jax.random.uniform(jax.random.key(50 + k), (4, RES, RES, 3))
        concept = PriorPrompts(Denoiser(apply, unet.init_params(jax.random.key(100 + k), seq_len=L)), tbl(10), None,
                               jnp.zeros((L, CTX)))
        inputs = s2.Stage2Inputs(grid=grid, vae=vp, concept=concept, reference=reference, lora_base=base_p,
                                 lora_color=tbl(30), lora_normal=tbl(31),
                                 context_feats=s2.patch_features(None, targets), context_c2w=cams.c2w,
                                 context_proj=cams.proj)
        train = {"camera_embedding": base_p["camera_embedding"], "delta": jnp.zeros(())}
        state = s2.init_state(geo0, s2.init_background(jax.random.key(300 + k)), train, opt)
        assets.append((inputs, state, jax.random.key(k)))
    return spec, opt, assets


def _timed(fn, n: int) -> tuple[float, list[float]]:
    import jax

    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return first, times


def worker(n_dev: int, per_device: int, steps: int, run_steps: int) -> dict:
    import jax
    import numpy as np

    from tsjax import parallel as par
    from tsjax.theme import stage2 as s2

    k_assets = n_dev * per_device
    t0 = time.perf_counter()
    spec, opt, assets = _setup(k_assets)
    setup_s = time.perf_counter() - t0
    row: dict = {"bench": "scaling", "platform": jax.default_backend(), "device_kind": jax.devices()[0].device_kind,
                 "devices": n_dev, "assets": k_assets, "assets_per_device": per_device, "cpu_count": os.cpu_count(),
                 "load_avg_start": os.getloadavg()[0], "setup_s": round(setup_s, 2), "steps_timed": steps,
                 "run_steps": run_steps, "shapes": f"{RES}px, B=1 + 2 ctx views, grid 12, 1-level tiny UNet x3"}
    if n_dev == 1:  # the step --devices 1 runs: one asset at a time
        single = s2.make_step(spec, opt)
        inputs, state, key = assets[0]
        holder = {"s": jax.tree.map(jax.numpy.array, state)}  # a copy: the step donates it

        def one():
            holder["s"], m = single(holder["s"], inputs, key)
            return m["loss"]

        first, times = _timed(one, steps)
        row["single_compile_s"] = round(first - statistics.median(times), 3)
        row["single_step_s_median"] = statistics.median(times)
        row["single_assets_per_hour"] = 3600.0 / (statistics.median(times) * run_steps)
    mesh = par.make_mesh(n_dev)
    multi = s2.make_sharded_step(spec, opt, mesh)
    per, shared = zip(*[s2.split_inputs(a[0]) for a in assets])
    per = par.shard_assets(par.stack_assets(per), mesh)
    shared = par.replicate(shared[0], mesh)
    keys = par.shard_assets(par.stack_assets([a[2] for a in assets]), mesh)
    holder = {"s": par.shard_assets(par.stack_assets([a[1] for a in assets]), mesh)}

    def many():
        holder["s"], m = multi(holder["s"], per, keys, shared)
        return m["loss"]

    first, times = _timed(many, steps)
    med = statistics.median(times)
    finite = np.asarray(jax.device_get(many()))
    row.update({"compile_s": round(first - med, 3), "step_s_median": med, "step_s_min": min(times),
                "finite_losses": bool(np.all(np.isfinite(finite))),
                "assets_per_hour": k_assets * 3600.0 / (med * run_steps),
                "assets_per_hour_with_compile": k_assets * 3600.0 / (med * run_steps + first - med),
                "load_avg_end": os.getloadavg()[0]})
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devices", default="1,2,4", help="comma-separated device counts (default 1,2,4)")
    p.add_argument("--assets-per-device", type=int, default=1)
    p.add_argument("--steps", type=int, default=8, help="timed steps after the first (compiling) call")
    p.add_argument("--run-steps", type=int, default=300, help="stage-2 steps per asset for assets/hour (tiny preset)")
    p.add_argument("--out", default=None)
    p.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker is not None:
        print(json.dumps(worker(a.worker, a.assets_per_device, a.steps, a.run_steps)), flush=True)
        return 0
    try:
        counts = [int(x) for x in a.devices.split(",")]
    except ValueError:
        print(f"error: --devices {a.devices!r}: expected comma-separated integers", file=sys.stderr)
        return 2
    if any(c < 1 for c in counts) or a.steps < 1 or a.assets_per_device < 1:
        print("error: --devices, --steps and --assets-per-device must be >= 1", file=sys.stderr)
        return 2
    rows = []
    for n in counts:
        env = dict(os.environ)
        if env.get("JAX_PLATFORMS", "cpu") == "cpu":
            env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={n}").strip()
        cmd = [sys.executable, __file__, "--worker", str(n), "--assets-per-device", str(a.assets_per_device),
               "--steps", str(a.steps), "--run-steps", str(a.run_steps)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            print(f"error: worker for {n} device(s) failed:\n{proc.stderr[-3000:]}", file=sys.stderr)
            return 1
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        row["date"] = datetime.date.today().isoformat()
        print(json.dumps(row), flush=True)
        rows.append(row)
    base = next((r for r in rows if r["devices"] == 1), None)
    summary = {"bench": "scaling_summary", "date": datetime.date.today().isoformat(), "platform": rows[0]["platform"],
               "assets_per_hour": {str(r["devices"]): round(r["assets_per_hour"], 1) for r in rows}}
    if base is not None:
        summary["speedup_vs_1"] = {str(r["devices"]): round(r["assets_per_hour"] / base["assets_per_hour"], 3)
                                   for r in rows}
    print(json.dumps(summary), flush=True)
    out = Path(a.out) if a.out else (Path(__file__).parent / "results" /
                                     f"scaling_{rows[0]['platform']}_{datetime.date.today().isoformat()}.jsonl")
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a") as f:
        for r in rows + [summary]:
            f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
