"""``python -m tsjax.optimize``: ThemeStation, theme-aware 3D-to-3D generation, end to end.

Examples::

    # CPU preset (default): built-in toy-houses theme, tiny from-scratch priors, minutes on 2 cores
    python -m tsjax.optimize --out runs/demo
    # your exemplars, the paper's settings (needs a local Stable Diffusion 2.1-base folder)
    python -m tsjax.optimize --exemplars my_owls/ --class owl --config paper --weights sd21-base/ --out runs/owls
    # ablation (b) of the paper, 3 assets, stop/resume
    python -m tsjax.optimize --set guidance.mode=naive --num-assets 3 --out runs/naive   # Ctrl-C ...
    python -m tsjax.optimize --set guidance.mode=naive --num-assets 3 --out runs/naive --resume
    # 4 assets optimised together, one per GPU (stage 2 sharded over an ``asset`` device-mesh axis)
    python -m tsjax.optimize --num-assets 4 --devices 4 --out runs/four
    # 2 hosts x 8 GPUs, 16 assets (run on every host; --out on a shared filesystem; see tsjax.parallel)
    TSJAX_COORDINATOR=host0:1234 TSJAX_NUM_PROCESSES=2 TSJAX_PROCESS_ID=$RANK \\
        python -m tsjax.optimize --num-assets 16 --devices 16 --out /shared/runs/sixteen

Outputs in ``--out``: ``index.html`` (gallery: exemplars, concept images, init, results side by side),
``manifest.json``, ``config.json``, ``concepts/``, ``exemplars/`` and per asset ``asset_<k>/`` with
``model.glb``, ``model.obj``, turntables (``turntable_color.png``, ``turntable_normal.png``,
``turntable.gif``), ``loss_curve.png``, ``metrics.jsonl`` and the stage-2 checkpoints ``ckpt/``.

User errors (missing exemplars or weights, an existing ``--out``, a NaN loss, ...) print one line
``error: ...`` and exit with status 2; Ctrl-C saves a checkpoint and exits with 130. In a multi-process
run (``TSJAX_*`` variables, see :mod:`tsjax.parallel`) a process that fails exits at once, skipping the
distributed shutdown, so its peers stop at their next barrier instead of waiting for a timeout.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import traceback
from pathlib import Path

__all__ = ["build_parser", "main", "config_from_args"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tsjax.optimize", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--exemplars", default=None,
                   help="folder of exemplar meshes (GLB/glTF/OBJ) or builtin:NAME (default: the config's, "
                        "builtin:toy-houses)")
    p.add_argument("--class", dest="class_name", default=None, help="object class used in the prompts (e.g. house)")
    p.add_argument("--config", default="tiny", help="tiny | paper | PATH.py defining get_config() (default tiny)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set guidance.alpha=0.3 (repeatable)")
    p.add_argument("--out", default="out/optimize",
                   help="output folder (default out/optimize; an existing one needs --resume or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--resume", action="store_true", help="continue a stopped run in --out (same config)")
    p.add_argument("--num-assets", type=int, default=1, help="number of assets (best-ranked concept images)")
    p.add_argument("--init", dest="init_mesh", default=None, metavar="MESH",
                   help="initial 3D model (else: nearest exemplar to the concept silhouette)")
    p.add_argument("--concept", default=None, metavar="IDX|PATH",
                   help="concept image: index into the sampled ones, or an image file")
    p.add_argument("--weights", default=None, metavar="DIR", help="local Stable Diffusion 2.1-base folder (paper)")
    p.add_argument("--vgg", default=None, metavar="FILE",
                   help="torchvision VGG19 weights for the contextual loss (else RGB-patch features)")
    p.add_argument("--devices", type=int, default=None, metavar="N",
                   help="optimise the --num-assets assets' stage 2 together, sharded over N devices (a multiple "
                        "of N assets; on CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N); "
                        "sets perf.devices, default 1 = one asset at a time")
    p.add_argument("--steps", type=int, default=None, help="stage-2 steps (overrides the config)")
    p.add_argument("--seed", type=int, default=None, help="random seed (overrides the config)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--compile-cache", default=None, metavar="DIR|off",
                   help="persistent XLA compilation cache (default $TSJAX_COMPILE_CACHE, else "
                        "~/.cache/tsjax/xla; 'off' disables): reruns of the same shapes skip compilation")
    p.add_argument("--evaluate", action="store_true",
                   help="run python -m tsjax.evaluate on the results at the end (into <out>/evaluation): "
                        "weight-free metrics always, learned ones when their weights are given")
    for flag, what in (("--clip", "transformers CLIPModel folder"), ("--vgg16", "torchvision VGG16 weights"),
                       ("--lpips", "LPIPS linear layers"), ("--aesthetic", "LAION aesthetic head")):
        p.add_argument(flag, default=None, metavar="PATH", help=f"{what} for --evaluate (optional)")
    return p


def config_from_args(args: argparse.Namespace):
    """The :class:`tsjax.config.Config` selected by ``--config`` with ``--set``/shortcut overrides."""
    from tsjax.config import apply_overrides, load_config

    cfg = load_config(args.config)
    cfg = apply_overrides(cfg, args.overrides)
    if args.exemplars is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, exemplars=args.exemplars))
    if args.class_name is not None:
        cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, class_name=args.class_name))
    if args.steps is not None:
        if args.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {args.steps}")
        cfg = dataclasses.replace(cfg, steps=args.steps)
    if args.devices is not None:
        if args.devices < 1:
            raise ValueError(f"--devices must be >= 1, got {args.devices}")
        cfg = dataclasses.replace(cfg, perf=dataclasses.replace(cfg.perf, devices=args.devices))
    if args.seed is not None:
        cfg = dataclasses.replace(cfg, seed=args.seed)
    return cfg


def evaluate_run(args: argparse.Namespace, cfg) -> int:
    """``python -m tsjax.evaluate --results <out> --exemplars <exemplars> --out <out>/evaluation`` with the
    weight files given to this command (metrics whose weights are missing are reported as not computed)."""
    from tsjax import evaluate

    out = Path(args.out)
    argv = ["--results", str(out), "--exemplars", cfg.data.exemplars, "--out", str(out / "evaluation"),
            "--prompt", f"a 3D model of {cfg.data.class_name}"]
    for flag in ("clip", "vgg", "vgg16", "lpips", "aesthetic"):
        v = getattr(args, flag)
        if v is not None:
            argv += [f"--{flag}", str(v)]
    print(f"evaluating: python -m tsjax.evaluate {' '.join(argv)}", file=sys.stderr, flush=True)
    return evaluate.main(argv)


def _hard_exit(code: int) -> None:
    """End this process of a multi-process run now, skipping ``jax.distributed``'s shutdown barrier (which
    would wait for peers still optimising): the peers then see the lost process at their next barrier
    (an error in seconds) instead of hanging until a timeout."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from tsjax.parallel import PeerLostError, initialize_distributed
    from tsjax.theme.pipeline import NonFiniteLossError

    distributed = False
    try:
        # multi-host: TSJAX_COORDINATOR/NUM_PROCESSES/PROCESS_ID, before any JAX computation
        distributed = initialize_distributed()
        rc = _main(args)
    except (ValueError, FileNotFoundError, NonFiniteLossError, PeerLostError) as e:
        print(f"error: {e}", file=sys.stderr)
        rc = 2
    except BaseException as e:  # Ctrl-C (SystemExit 130 after saving), crashes
        if not distributed:
            raise
        if not isinstance(e, SystemExit):
            traceback.print_exc()
        _hard_exit(e.code if isinstance(e, SystemExit) and isinstance(e.code, int) else 1)
    if distributed and rc != 0:
        _hard_exit(rc)
    return rc


def _main(args: argparse.Namespace) -> int:
    import jax

    from tsjax.compile_cache import default_cache_dir, enable_compile_cache
    from tsjax.theme.pipeline import RunOptions, run

    cfg = config_from_args(args)
    enable_compile_cache(default_cache_dir() if args.compile_cache is None else args.compile_cache)
    opts = RunOptions(out=Path(args.out), num_assets=args.num_assets, init_mesh=args.init_mesh,
                      concept=args.concept, weights=args.weights, vgg=args.vgg, resume=args.resume,
                      overwrite=args.overwrite, progress=not args.no_progress)
    if args.evaluate:
        for flag in ("clip", "vgg16", "lpips", "aesthetic"):
            v = getattr(args, flag)
            if v is not None and not Path(v).exists():
                raise FileNotFoundError(f"--{flag} {v}: not found")
    manifest = run(cfg, opts)
    if args.evaluate and jax.process_index() == 0:  # multi-process: process 0 evaluates the whole run
        rc = evaluate_run(args, cfg)
        if rc != 0:
            return rc
    total = manifest["timings"]["total_s"]
    who = f"process {jax.process_index()}: " if jax.process_count() > 1 else ""
    print(f"{who}wrote {len(manifest['assets'])} asset(s) to {args.out} in {total:.0f} s; "
          f"open {Path(args.out) / 'index.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
