"""Benchmark tsjax's Flax UNet/VAE against diffusers PyTorch with the SAME weights (JSON lines).

    python bench/diffusion.py [--configs mid,sd21-base] [--threads 1] [--iters 3] [--out bench.jsonl]
                              [--conv-algorithm direct|winograd2|winograd4]
                              [--batches 2,1] [--max-rss-gb N]

For each config a subprocess builds the diffusers PyTorch models with a fixed seed and
``save_pretrained``s them (safetensors) to a temporary folder; each measurement then starts two fresh
worker processes, tsjax and PyTorch, that load those weights (PyTorch: ``from_pretrained``; tsjax:
``tsjax.diffusion.convert``), compile / warm up one after the other, and are then **interleaved**: the
parent asks each for one step, round after round, alternating which goes first (``_workers.py``: the
speed of this shared machine drifts by up to 2.5x within seconds, so back-to-back runs compare machine
states, not frameworks). Each framework keeps its own process, so each peak-memory figure belongs to it
alone: the resident-set high-water mark ``VmHWM`` from ``/proc/self/status`` (it sees XLA's and
PyTorch's native allocations, which ``tracemalloc``/``getrusage`` do not), read at the end, minus
nothing: it includes the interpreter and the loaded weights.

Measurements (``kind``): ``unet_fwd`` (UNet forward), ``unet_fwd_bwd`` (forward + gradient of
``mean(out^2)`` w.r.t. all UNet params), ``vae_enc_bwd`` (VAE encoder forward + gradient of
``mean(mean_latent^2)`` w.r.t. the VAE params). ``compile_s``: tsjax ``jit`` lower+compile time (for
PyTorch, eager, the first call's extra time over a steady call); ``step_s``: median of ``--iters``
interleaved steady-state calls (``step_s_min`` their minimum); ``loadavg_1min``: the machine's 1-minute
load average when the worker started and ended. tsjax records also say whether the native CPU conv
kernels were used (``native_conv``, ``cpu_isa``; ``TSJAX_NATIVE_CONV=0`` turns them off). Both frameworks get the same number of CPU threads (``--threads``) and each worker is pinned to that many cores (``_cpus.py``: XLA's GEMMs use every core whatever its thread flags). A summary line
per (config, kind) gives ``ratio = tsjax step_s / torch step_s`` (of medians), ``ratio_min`` and
``per_round_ratio_median`` (the median of the per-round ratios, the steadiest figure). A config is skipped, with the reason
recorded, when the machine's available memory is below its estimated need.

Memory guard (the machine is shared): the parent polls each worker's resident set and kills it when it
exceeds ``--max-rss-gb`` (default: half the available memory at the start minus 1 GiB: both workers are
alive together) or when the machine's available memory drops under 1 GiB. ``--batches`` lists the batch sizes to try per measurement, largest
first (default: the config's batch): when a worker of either framework is killed by the guard (or fails)
at one batch size, both frameworks are measured again at the next one, and the records say so
(``"batch"`` in every record; ``"fallback_from"`` on the summary).

Configs: ``mid`` = UNet blocks 128/256/512 (cross-attn dim 768, 32x32 latents, batch 2) and VAE
blocks 128/256/512 (128x128 images -> 32x32 latents, batch 2); ``sd21-base`` = Stable Diffusion
2.1-base UNet (320/640/1280/1280, heads 5/10/20/20, linear projection, cross-attn dim 1024, 64x64
latents, 865.9 M parameters) and VAE (128/256/512/512, 512x512 images), batch 2 by default with the
``--batches 2,1`` fallback. ``--iters`` interleaved rounds (default 5 for mid, 2 for sd21-base).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cpus import pin_from_env, worker_env  # noqa: E402
from _workers import Worker, available_gb, emit_result, interleave, ratio_summary, reset_peak, serve, status_mb  # noqa: E402

from tsjax.config import CONV_ALGORITHMS  # noqa: E402  (tsjax.config loads no jax)

PINNED_CPUS = pin_from_env()  # workers: their share of the cores, set before jax/torch load

CONFIGS = {
    "mid": dict(
        batch=2, seq=77,
        unet=dict(sample_size=32, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(128, 256, 512),
                  down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
                  cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512),
                 down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                 layers_per_block=2, norm_num_groups=32, sample_size=128),
        need_gb=6,
    ),
    "sd21-base": dict(
        batch=2, seq=77,
        unet=dict(sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
                  block_out_channels=(320, 640, 1280, 1280),
                  down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
                  up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
                  cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                  norm_num_groups=32),
        vae=dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
                 down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                 layers_per_block=2, norm_num_groups=32, sample_size=512),
        need_gb=14,
    ),
}
KINDS = ("unet_fwd", "unet_fwd_bwd", "vae_enc_bwd")


def build_weights(name: str, root: Path) -> None:
    """Create the seeded diffusers models of config ``name`` and save them under ``root/{unet,vae}``."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    cfg = CONFIGS[name]
    torch.manual_seed(0)
    UNet2DConditionModel(**cfg["unet"]).save_pretrained(root / "unet")
    torch.manual_seed(1)
    AutoencoderKL(**cfg["vae"]).save_pretrained(root / "vae")


def _inputs(name: str, batch: int):
    import numpy as np

    cfg = CONFIGS[name]
    B, s = batch, cfg["unet"]["sample_size"]
    rng = np.random.default_rng(0)
    x = rng.standard_normal((B, s, s, 4)).astype(np.float32)
    t = np.array([500 + 100 * i for i in range(B)], np.int64)
    ctx = rng.standard_normal((B, cfg["seq"], cfg["unet"]["cross_attention_dim"])).astype(np.float32)
    H = cfg["vae"]["sample_size"]
    img = np.tanh(rng.standard_normal((B, H, H, 3))).astype(np.float32)
    return x, t, ctx, img


def worker_torch(name: str, kind: str, root: Path, threads: int, batch: int):
    """``(step, setup)``: one PyTorch step of ``kind`` and its first call's extra time."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel

    torch.set_num_threads(threads)
    x, t, ctx, img = _inputs(name, batch)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).contiguous()
    if kind.startswith("unet"):
        m = UNet2DConditionModel.from_pretrained(root / "unet")

        def run():
            if kind == "unet_fwd":
                with torch.no_grad():
                    m(xt, torch.from_numpy(t), torch.from_numpy(ctx)).sample
            else:
                m.zero_grad(set_to_none=True)
                m(xt, torch.from_numpy(t), torch.from_numpy(ctx)).sample.square().mean().backward()
    else:
        m = AutoencoderKL.from_pretrained(root / "vae")
        it = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()

        def run():
            m.zero_grad(set_to_none=True)
            m.encode(it).latent_dist.mean.square().mean().backward()
    t0 = time.perf_counter()
    run()
    first = time.perf_counter() - t0
    t0 = time.perf_counter()
    run()
    return run, {"compile_s": max(first - (time.perf_counter() - t0), 0.0), "torch_threads": torch.get_num_threads()}


def worker_jax(name: str, kind: str, root: Path, threads: int, batch: int):
    """``(step, setup)``: one tsjax step of ``kind`` (compiled, warmed up) and its compile time."""
    import jax
    import jax.numpy as jnp

    from tsjax.diffusion import convert
    from tsjax.diffusion.unet import UNet2DConditionModel
    from tsjax.diffusion.vae import AutoencoderKL
    from tsjax.ops import _ffi
    from tsjax.ops.conv import current_algorithm, native_available

    x, t, ctx, img = _inputs(name, batch)
    if kind.startswith("unet"):
        ucfg, params = convert.load_unet(str(root / "unet"))
        module = UNet2DConditionModel(ucfg)
        args = (jnp.asarray(x), jnp.asarray(t, jnp.int32), jnp.asarray(ctx))

        def fwd(p, x, t, ctx):
            return module.apply({"params": p}, x, t, ctx)

        def loss(p, *a):
            return jnp.mean(jnp.square(fwd(p, *a)))

        f = jax.jit(fwd) if kind == "unet_fwd" else jax.jit(jax.grad(loss))
    else:
        vcfg, params = convert.load_vae(str(root / "vae"))
        module = AutoencoderKL(vcfg)
        args = (jnp.asarray(img),)

        def loss(p, img):
            mean, _ = module.apply({"params": p}, img, method=module.encode)
            return jnp.mean(jnp.square(mean))

        f = jax.jit(jax.grad(loss))
    t0 = time.perf_counter()
    compiled = f.lower(params, *args).compile()
    compile_s = time.perf_counter() - t0

    def run():
        jax.block_until_ready(compiled(params, *args))

    run()  # first call (allocations)
    run()
    return run, {"compile_s": compile_s, "native_conv": native_available(), "cpu_isa": _ffi.cpu_isa(),
                 "conv_algorithm": current_algorithm()}


def run_worker(argv) -> None:
    fw, name, kind, root = argv[0], argv[1], argv[2], Path(argv[3])
    threads, batch = int(argv[4]), int(argv[5])
    load0 = os.getloadavg()[0]
    run, setup = (worker_jax if fw == "tsjax" else worker_torch)(name, kind, root, threads, batch)
    reset_ok = reset_peak()  # step memory from here (weights and compiled program are resident)
    emit_result(setup)
    serve(run, status_mb("VmRSS"), reset_ok,
          lambda: {"loadavg_1min": [round(load0, 2), round(os.getloadavg()[0], 2)]})


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0] == "--worker":
        run_worker(argv[1:])
        return 0
    if argv and argv[0] == "--build":
        build_weights(argv[1], Path(argv[2]))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="mid,sd21-base")
    ap.add_argument("--kinds", default=",".join(KINDS))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--iters", type=int, default=None, help="interleaved rounds (default: 5 mid, 2 sd21-base)")
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--conv-algorithm", default=None, choices=CONV_ALGORITHMS,
                    help="tsjax conv algorithm (TSJAX_CONV_ALGORITHM for the tsjax workers; default: the "
                         "environment's, else direct)")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes to try per measurement, largest first (default: config's)")
    ap.add_argument("--max-rss-gb", type=float, default=None,
                    help="kill a worker above this resident set (default: half the available memory - 1 GiB)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if batches is not None and (not batches or min(batches) < 1):
        print(f"error: --batches {args.batches}: expected positive integers", file=sys.stderr)
        return 2
    max_rss_mb = 1024.0 * (args.max_rss_gb if args.max_rss_gb else available_gb() / 2 - 1.0)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}").strip()
    env["OMP_NUM_THREADS"] = str(args.threads)
    env = worker_env(env, args.threads)  # CPU affinity: XLA ignores thread counts for GEMMs
    env["JAX_PLATFORMS"] = "cpu"
    env["PYTHONUNBUFFERED"] = "1"
    if args.conv_algorithm:
        env["TSJAX_CONV_ALGORITHM"] = args.conv_algorithm  # read by tsjax only
    lines = []
    logdir = Path(tempfile.mkdtemp(prefix="diffusion_bench_logs_"))

    def emit(rec):
        line = json.dumps(rec)
        print(line, flush=True)
        lines.append(line)

    for name in args.configs.split(","):
        cfg = CONFIGS[name]
        avail = available_gb()
        if avail < cfg["need_gb"]:
            emit({"config": name, "skipped": f"needs ~{cfg['need_gb']} GB free, {avail:.1f} GB available"})
            continue
        with tempfile.TemporaryDirectory() as d:
            proc = subprocess.run([sys.executable, __file__, "--build", name, d], capture_output=True, text=True,
                                  env=env)
            if proc.returncode:
                emit({"config": name, "error": "building weights: " +
                      (proc.stderr.strip().splitlines() or ["?"])[-1][:300]})
                continue
            iters = args.iters or (5 if name == "mid" else 2)
            for kind in args.kinds.split(","):
                tried = []
                for batch in batches or [cfg["batch"]]:
                    workers, setup, failed = {}, {}, None
                    try:
                        for fw in ("tsjax", "torch"):  # set up one at a time (no two compiles competing)
                            w = Worker(Path(__file__).resolve(), f"{fw}:{name}:{kind}:{batch}",
                                       [fw, name, kind, d, str(args.threads), str(batch)], env, logdir, max_rss_mb)
                            workers[fw] = w
                            setup[fw] = w.read()
                        times = interleave(workers, iters)
                        fin = {fw: w.ask("finish") for fw, w in workers.items()}
                    except RuntimeError as e:
                        failed = str(e)
                    finally:
                        for w in workers.values():
                            w.close()
                    if failed:
                        emit({"config": name, "kind": kind, "batch": batch, "error": failed[:300]})
                        tried.append(batch)
                        continue
                    for fw in ("tsjax", "torch"):
                        ts = times[fw]
                        emit(dict(framework=fw, config=name, kind=kind, batch=batch, step_s=statistics.median(ts),
                                  step_s_min=min(ts), iters=len(ts), threads=args.threads,
                                  cpus_pinned=args.threads, **setup[fw], **fin[fw]))
                    rec = {"config": name, "kind": kind, "batch": batch, "summary": True,
                           "conv_algorithm": setup["tsjax"].get("conv_algorithm"),
                           **ratio_summary(times["tsjax"], times["torch"]),
                           "ratio_peak_rss": round(fin["tsjax"]["peak_rss_mb"] / fin["torch"]["peak_rss_mb"], 3)}
                    rec["ratio_step_tsjax_over_torch"] = rec["ratio_median"]
                    if tried:
                        rec["fallback_from"] = tried
                    emit(rec)
                    break
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
