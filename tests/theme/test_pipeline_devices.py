"""``python -m tsjax.optimize --devices 2``: two assets' stage 2 in one loop sharded over 2 host devices.

Runs the toy pipeline of tests/theme/test_pipeline_toy.py (duck-typed tiny diffusion bundle, same small
config) in a fresh interpreter with ``XLA_FLAGS=--xla_force_host_platform_device_count=2`` (the flag
must be set before jax is imported): this file executed as a script runs the pipeline into the folder
given as its argument. Checks: both assets' outputs exist, each asset has its own metrics.jsonl with
every step, the manifest records 2 devices and the sharded mode, checkpoints are per asset,
``--resume`` after removing the final checkpoints continues the sharded loop to the same losses, and the
multi-host path (two ``jax.distributed`` processes on localhost, one CPU device each, gloo) gives the
same per-asset losses, each process checkpointing its own asset and process 0 writing the manifest.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

STEPS = 4


def _toy_module():
    path = Path(__file__).with_name("test_pipeline_toy.py")
    spec = importlib.util.spec_from_file_location("_toy_pipeline_helpers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _main(out: str, extra: list[str]) -> int:
    local = os.environ.get("TSJAX_TEST_LOCAL_DEVICES", "2")  # 1 per process in the two-process run
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={local}"
    toy = _toy_module()
    from tsjax.optimize import main
    from tsjax.theme import pipeline, priors

    priors.load_base = toy.toy_bundle
    pipeline._lora_parts = toy.toy_lora_parts
    args = ["--out", out, "--steps", str(STEPS), "--no-progress", "--exemplars", "builtin:toy-houses",
            "--num-assets", "2", "--devices", "2"]
    for s in toy.SMALL:
        args += ["--set", s.replace("checkpoint_every=3", "checkpoint_every=2")]
    return main(args + extra)


def _run(out: Path, *extra: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    return subprocess.run([sys.executable, __file__, str(out), *extra], capture_output=True, text=True, env=env,
                          timeout=900)


def _run_two_processes(out: Path, launch) -> list[subprocess.CompletedProcess]:
    """The same run as two jax.distributed processes with one CPU device each (gloo on localhost)."""
    return launch([sys.executable, __file__, str(out)], env={"TSJAX_TEST_LOCAL_DEVICES": "1"}, timeout=900)


def _records(path: Path) -> list[dict]:
    rs = [json.loads(x) for x in path.read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rs]


@pytest.mark.slow
def test_two_assets_sharded_over_two_devices(tmp_path, launch_processes):
    out = tmp_path / "run"
    proc = _run(out)
    assert proc.returncode == 0, proc.stderr[-4000:]
    man = json.loads((out / "manifest.json").read_text())
    assert man["devices"] == 2 and man["stage2_mode"] == "sharded"
    assert len(man["assets"]) == 2 and man["timings"]["stage2_group_s"] > 0
    full = {}
    for a in man["assets"]:
        for k in ("glb", "obj", "turntable_color", "turntable_normal", "turntable_gif", "loss_curve"):
            assert (out / a[k]).is_file(), (a["dir"], k)
        assert a["stage2_steps"] == STEPS and a["num_faces"] > 0
        recs = _records(out / a["dir"] / "metrics.jsonl")
        assert [r["step"] for r in recs] == list(range(STEPS))
        assert all(r["finite"] == 1.0 for r in recs)
        assert sorted(p.name for p in (out / a["dir"] / "ckpt").iterdir() if p.name.isdigit()) == ["2", str(STEPS)]
        full[a["dir"]] = recs
    # the two assets are different problems (own concept prior, init, seeds)
    assert full["asset_0"][0]["loss"] != full["asset_1"][0]["loss"]
    # stop after step 2 of the sharded loop: remove the final checkpoints; --resume continues both assets
    for a in man["assets"]:
        shutil.rmtree(out / a["dir"] / "ckpt" / str(STEPS))
    proc = _run(out, "--resume")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed asset_0, asset_1 at step 2" in proc.stderr
    for d, recs in full.items():
        assert _records(out / d / "metrics.jsonl") == recs, d

    # multi-host path: 2 processes x 1 device (jax.distributed, TSJAX_* variables) = the same group
    out2 = tmp_path / "two_processes"
    p0, p1 = _run_two_processes(out2, launch_processes)
    assert p0.returncode == 0 and p1.returncode == 0, (p0.stderr[-3000:], p1.stderr[-3000:])
    assert "process 1/2: waiting for process 0's shared stages" in p1.stderr
    assert "process 0/2: assets [0]" in p0.stderr and "process 1/2: assets [1]" in p1.stderr
    man2 = json.loads((out2 / "manifest.json").read_text())  # written by process 0 with both assets
    assert man2["processes"] == 2 and man2["devices"] == 2 and [a["dir"] for a in man2["assets"]] == list(full)
    assert (out2 / "index.html").is_file()
    for d, recs in full.items():
        recs2 = _records(out2 / d / "metrics.jsonl")
        assert [r["step"] for r in recs2] == list(range(STEPS)), d
        for r1, r2 in zip(recs, recs2):  # one program per device either way: the same numbers
            for k, v in r1.items():
                assert r2[k] == pytest.approx(v, rel=1e-5, abs=1e-6), (d, r1["step"], k)
        assert sorted(p.name for p in (out2 / d / "ckpt").iterdir() if p.name.isdigit()) == ["2", str(STEPS)]


def test_devices_must_divide_assets(tmp_path, capsys):
    from tsjax.optimize import main

    rc = main(["--out", str(tmp_path / "run"), "--devices", "2", "--num-assets", "3", "--no-progress"])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --devices 2: --num-assets 3 is not a multiple") and "Traceback" not in err
    assert not (tmp_path / "run").exists()  # refused before any work


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1], sys.argv[2:]))
