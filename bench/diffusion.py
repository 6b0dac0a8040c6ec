"""Benchmark tsjax's Flax UNet/VAE against diffusers PyTorch with the SAME weights (JSON lines).

    python bench/diffusion.py [--configs mid,sd21-base] [--threads 1] [--iters 3] [--out bench.jsonl]
                              [--batches 2,1] [--max-rss-gb N]

For each config a subprocess builds the diffusers PyTorch models with a fixed seed and
``save_pretrained``s them (safetensors) to a temporary folder; every measurement then runs in its own
fresh subprocess, one after the other, that loads those weights (PyTorch: ``from_pretrained``; tsjax:
``tsjax.diffusion.convert``) so that each peak-memory figure belongs to that measurement alone and the
two frameworks never hold a model at the same time. Peak memory is the process's
resident-set high-water mark ``VmHWM`` from ``/proc/self/status`` (it sees XLA's and PyTorch's native
allocations, which ``tracemalloc``/``getrusage`` do not), read at the end of the worker, minus nothing:
it includes the interpreter and the loaded weights.

Measurements (``kind``): ``unet_fwd`` (UNet forward), ``unet_fwd_bwd`` (forward + gradient of
``mean(out^2)`` w.r.t. all UNet params), ``vae_enc_bwd`` (VAE encoder forward + gradient of
``mean(mean_latent^2)`` w.r.t. the VAE params). ``compile_s``: tsjax ``jit`` lower+compile time (for
PyTorch, eager, the first call's extra time over a steady call); ``step_s``: median of ``--iters``
steady-state calls; ``loadavg_1min``: the machine's 1-minute load average when the worker started and
ended (the CPU may be shared; a load above the core count slows both frameworks unevenly). Both frameworks get the same number of CPU threads (``--threads``) and each worker is pinned to that many cores (``_cpus.py``: XLA's GEMMs use every core whatever its thread flags). A summary line
per (config, kind) gives ``ratio = tsjax step_s / torch step_s``. A config is skipped, with the reason
recorded, when the machine's available memory is below its estimated need.

Memory guard (the machine is shared): the parent polls each worker's resident set and kills it when it
exceeds ``--max-rss-gb`` (default: available memory at the start minus 2 GiB) or when the machine's
available memory drops under 1 GiB. ``--batches`` lists the batch sizes to try per measurement, largest
first (default: the config's batch): when a worker of either framework is killed by the guard (or fails)
at one batch size, both frameworks are measured again at the next one, and the records say so
(``"batch"`` in every record; ``"fallback_from"`` on the summary).

Configs: ``mid`` = UNet blocks 128/256/512 (cross-attn dim 768, 32x32 latents, batch 2) and VAE
blocks 128/256/512 (128x128 images -> 32x32 latents, batch 2); ``sd21-base`` = Stable Diffusion
2.1-base UNet (320/640/1280/1280, heads 5/10/20/20, linear projection, cross-attn dim 1024, 64x64
latents, 865.9 M parameters) and VAE (128/256/512/512, 512x512 images), batch 2 by default with the
``--batches 2,1`` fallback; one warm-up and one timed iteration (``--iters`` applies to ``mid`` only).
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


def vm_hwm_mb() -> float:
    """Resident-set high-water mark of this process in MiB (``VmHWM`` of /proc/self/status)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024.0**2
    return float("nan")


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


def _time(fn, iters):
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def worker_torch(name: str, kind: str, root: Path, iters: int, threads: int, batch: int) -> dict:
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
    step = _time(run, iters)
    return {"compile_s": max(first - step, 0.0), "step_s": step}


def worker_jax(name: str, kind: str, root: Path, iters: int, threads: int, batch: int) -> dict:
    import jax
    import jax.numpy as jnp

    from tsjax.diffusion import convert
    from tsjax.diffusion.unet import UNet2DConditionModel
    from tsjax.diffusion.vae import AutoencoderKL

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
    jax.block_until_ready(compiled(params, *args))  # first call (allocations)
    step = _time(lambda: jax.block_until_ready(compiled(params, *args)), iters)
    return {"compile_s": compile_s, "step_s": step}


def run_worker(argv) -> None:
    fw, name, kind, root = argv[0], argv[1], argv[2], Path(argv[3])
    iters, threads, batch = int(argv[4]), int(argv[5]), int(argv[6])
    load0 = os.getloadavg()[0]
    res = (worker_jax if fw == "tsjax" else worker_torch)(name, kind, root, iters, threads, batch)
    res.update(framework=fw, config=name, kind=kind, batch=batch, peak_rss_mb=round(vm_hwm_mb(), 1),
               threads=threads, cpus_pinned=PINNED_CPUS, iters=iters, loadavg_1min=[round(load0, 2), round(os.getloadavg()[0], 2)])
    print("RESULT " + json.dumps(res))


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def run_guarded(cmd: list[str], env: dict, max_rss_mb: float) -> tuple[int, str, str, str | None]:
    """Run ``cmd``; kill it when its RSS exceeds ``max_rss_mb`` or the machine's available memory drops
    below 1 GiB. Returns ``(returncode, stdout, stderr, kill_reason or None)``."""
    with tempfile.TemporaryFile("w+") as fo, tempfile.TemporaryFile("w+") as fe:
        proc = subprocess.Popen(cmd, stdout=fo, stderr=fe, text=True, env=env)
        reason, peak = None, 0.0
        while proc.poll() is None:
            rss = _rss_mb(proc.pid)
            peak = max(peak, rss)
            if rss > max_rss_mb:
                reason = f"memory guard: worker RSS {rss:.0f} MiB > limit {max_rss_mb:.0f} MiB"
            elif available_gb() < 1.0:
                reason = f"memory guard: machine available memory < 1 GiB (worker RSS {rss:.0f} MiB)"
            if reason:
                proc.kill()
                proc.wait()
                break
            time.sleep(0.25)
        fo.seek(0)
        fe.seek(0)
        return proc.returncode, fo.read(), fe.read(), reason


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
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--out", default=None, help="also append the JSON lines to this file")
    ap.add_argument("--batches", default=None,
                    help="comma-separated batch sizes to try per measurement, largest first (default: config's)")
    ap.add_argument("--max-rss-gb", type=float, default=None,
                    help="kill a worker above this resident set (default: available memory - 2 GiB)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    if batches is not None and (not batches or min(batches) < 1):
        print(f"error: --batches {args.batches}: expected positive integers", file=sys.stderr)
        return 2
    max_rss_mb = 1024.0 * (args.max_rss_gb if args.max_rss_gb else available_gb() - 2.0)
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_cpu_multi_thread_eigen={'true' if args.threads > 1 else 'false'}").strip()
    env["OMP_NUM_THREADS"] = str(args.threads)
    env = worker_env(env, args.threads)  # CPU affinity: XLA ignores thread counts for GEMMs
    env["JAX_PLATFORMS"] = "cpu"
    lines = []

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
            iters = args.iters if name == "mid" else 1
            for kind in args.kinds.split(","):
                tried = []
                for batch in batches or [cfg["batch"]]:
                    res = {}
                    for fw in ("tsjax", "torch"):
                        cmd = [sys.executable, __file__, "--worker", fw, name, kind, d, str(iters),
                               str(args.threads), str(batch)]
                        rc, out, err, killed = run_guarded(cmd, env, max_rss_mb)
                        out = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
                        if killed or rc or not out:
                            emit({"config": name, "kind": kind, "framework": fw, "batch": batch,
                                  "error": killed or (err.strip().splitlines() or ["?"])[-1][:300]})
                            break
                        res[fw] = json.loads(out[-1][7:])
                        emit(res[fw])
                    if len(res) == 2:
                        rec = {"config": name, "kind": kind, "batch": batch, "summary": True,
                               "ratio_step_tsjax_over_torch": round(res["tsjax"]["step_s"] / res["torch"]["step_s"], 3),
                               "ratio_peak_rss": round(res["tsjax"]["peak_rss_mb"] / res["torch"]["peak_rss_mb"], 3)}
                        if tried:
                            rec["fallback_from"] = tried
                        emit(rec)
                        break
                    tried.append(batch)
    if args.out:
        with open(args.out, "a") as fh:
            fh.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
