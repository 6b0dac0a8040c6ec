"""``python -m tsjax.optimize``: user errors (one line, exit 2) and end-to-end runs of the tiny preset."""
import subprocess
import sys

import pytest

from tsjax.optimize import main


def _err(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_no_meshes_in_exemplars(tmp_path, capsys):
    (tmp_path / "ex").mkdir()
    (tmp_path / "ex" / "notes.txt").write_text("no meshes here")
    assert main(["--exemplars", str(tmp_path / "ex"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "no mesh files" in _err(capsys)
    assert main(["--exemplars", str(tmp_path / "nope"), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "does not exist" in _err(capsys)


def test_paper_needs_weights(tmp_path, capsys):
    assert main(["--config", "paper", "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    assert "--weights" in _err(capsys)
    w = tmp_path / "sd"
    w.mkdir()
    (w / "model_index.json").write_text("{}")
    (w / "unet").mkdir()
    assert main(["--config", "paper", "--weights", str(w), "--out", str(tmp_path / "o"), "--no-progress"]) == 2
    msg = _err(capsys)
    assert "missing vae, text_encoder, tokenizer, scheduler" in msg and str(w) in msg
    assert not (tmp_path / "o").exists()


def test_existing_out_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "o"
    out.mkdir()
    (out / "something").write_text("x")
    assert main(["--out", str(out), "--no-progress"]) == 2
    assert "already exists; pass --resume" in _err(capsys)
    assert main(["--out", str(out), "--resume", "--no-progress"]) == 2
    assert "config.json missing" in _err(capsys)
    assert main(["--out", str(tmp_path / "fresh"), "--resume", "--no-progress"]) == 2
    assert "nothing to resume" in _err(capsys)


def test_bad_overrides_and_args(tmp_path, capsys):
    assert main(["--out", str(tmp_path / "o"), "--set", "guidance.alhpa=1", "--no-progress"]) == 2
    assert "unknown config key" in _err(capsys)
    assert main(["--out", str(tmp_path / "o"), "--steps", "0", "--no-progress"]) == 2
    assert "--steps must be >= 1" in _err(capsys)
    assert main(["--out", str(tmp_path / "o"), "--concept", str(tmp_path / "c.png"), "--no-progress"]) == 2
    assert "image file not found" in _err(capsys)
    assert main(["--out", str(tmp_path / "o"), "--vgg", str(tmp_path / "v.pth"), "--no-progress"]) == 2
    assert "VGG19 weights file not found" in _err(capsys)
    assert main(["--out", str(tmp_path / "o"), "--config", "nope", "--no-progress"]) == 2
    assert "no preset named 'nope'" in _err(capsys)


def test_evaluate_weight_paths_checked_before_running(tmp_path, capsys):
    out = tmp_path / "o"
    assert main(["--out", str(out), "--evaluate", "--clip", str(tmp_path / "clip"), "--no-progress"]) == 2
    assert "--clip" in _err(capsys) and not out.exists()


def test_module_entry_point_help():
    r = subprocess.run([sys.executable, "-m", "tsjax.optimize", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--exemplars" in r.stdout and "--resume" in r.stdout


def test_devices_errors_are_clear(tmp_path, capsys):
    """--devices N needs K = --num-assets a multiple of N and N visible devices (one here); nothing is written."""
    assert main(["--out", str(tmp_path / "o"), "--set", "perf.devices=2", "--no-progress"]) == 2
    assert "--num-assets 1 is not a multiple of the device count" in _err(capsys)
    assert main(["--out", str(tmp_path / "o"), "--devices", "2", "--num-assets", "2", "--no-progress"]) == 2
    assert "only 1 cpu device(s) are visible" in _err(capsys)
    assert not (tmp_path / "o").exists()


def test_multi_process_failure_ends_every_process_quickly(tmp_path, launch_processes):
    """Two jax.distributed processes (localhost, gloo); process 1 gets a missing --init file: it prints the
    one-line error and exits 2 at once, and process 0 stops at its next barrier instead of hanging."""
    import time

    t0 = time.monotonic()
    procs = launch_processes(
        [sys.executable, "-m", "tsjax.optimize", "--out", str(tmp_path / "run"), "--devices", "2", "--num-assets",
         "2", "--no-progress", "--compile-cache", "off"],
        env={"XLA_FLAGS": "--xla_force_host_platform_device_count=1"},
        per_process=lambda pid: ["--init", str(tmp_path / "missing.obj")] if pid == 1 else [], timeout=240)
    elapsed = time.monotonic() - t0
    e0, e1 = procs[0].stderr, procs[1].stderr
    assert procs[1].returncode == 2 and "error: --init" in e1 and "mesh file not found" in e1, e1[-2000:]
    assert procs[0].returncode == 2 and "error: multi-process barrier" in e0 and "another process" in e0, e0[-2000:]
    assert elapsed < 120, f"the processes took {elapsed:.0f} s to stop (shutdown-barrier hang?)"
    assert not (tmp_path / "run" / "cache" / "theme_prior.msgpack").exists()  # no stage work was done
