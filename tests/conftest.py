"""Shared test fixtures.

Tests are deterministic and CPU-only. Real exemplar meshes come from ``../shared/exemplars`` (or
``$TSJAX_EXEMPLARS``); tests that need them skip with a message when the folder is absent.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# CLIs run in-process by the tests (python -m tsjax.optimize's main) use the persistent compilation cache;
# keep it inside the checkout (ignored by git) rather than in the user's ~/.cache.
os.environ.setdefault("TSJAX_COMPILE_CACHE", str(REPO / ".pytest_cache" / "tsjax-xla"))


def _exemplar_root() -> Path:
    env = os.environ.get("TSJAX_EXEMPLARS")
    return Path(env) if env else REPO.parent / "shared" / "exemplars"


@pytest.fixture(scope="session")
def exemplars_root() -> Path:
    root = _exemplar_root()
    if not root.is_dir():
        pytest.skip(f"real exemplar sets not found at {root} (set TSJAX_EXEMPLARS to run these tests)")
    return root


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture
def check_thread_isa_invariance(monkeypatch):
    """``check(run, isa_rel=1e-6)`` for tests of tsjax's native CPU kernels: ``run()`` executes them (a
    compiled function; the kernels read ``TSJAX_CPU_THREADS`` / ``TSJAX_CPU_ISA`` at every call) and returns
    a list of arrays. They must be bit-identical with 1, 2 and 3 threads and the default, and, where the CPU
    has AVX-512, within ``isa_rel`` (max abs difference over max abs value) with the AVX2 kernels."""
    import numpy as np

    from tsjax.ops import _ffi

    def check(run, isa_rel=1e-6):
        base = [np.asarray(a) for a in run()]
        for threads in ("1", "2", "3"):
            monkeypatch.setenv("TSJAX_CPU_THREADS", threads)
            for a, b in zip(base, run(), strict=True):
                np.testing.assert_array_equal(a, np.asarray(b), err_msg=f"TSJAX_CPU_THREADS={threads}")
        monkeypatch.delenv("TSJAX_CPU_THREADS")
        if _ffi.cpu_isa() >= 2:  # the AVX2 kernels: other summation orders only
            monkeypatch.setenv("TSJAX_CPU_ISA", "avx2")
            for a, b in zip(base, run(), strict=True):
                a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
                rel = float(np.abs(a - b).max() / max(np.abs(a).max(), 1e-30))
                assert rel < isa_rel, f"TSJAX_CPU_ISA=avx2: relative difference {rel:.2e}"
            monkeypatch.delenv("TSJAX_CPU_ISA")

    return check


def _launch_processes(argv, *, n: int = 2, env: dict | None = None, per_process=None, timeout: float = 300):
    """Run ``n`` copies of ``argv`` as one ``jax.distributed`` job on localhost and wait for all of them.

    Each process gets ``JAX_PLATFORMS=cpu``, the ``TSJAX_COORDINATOR`` / ``TSJAX_NUM_PROCESSES`` /
    ``TSJAX_PROCESS_ID`` variables (a free local port), no inherited ``XLA_FLAGS``, then ``env``;
    ``per_process(pid)`` returns extra arguments for process ``pid``. Processes still running after
    ``timeout`` s (or when waiting fails) are killed. Returns one ``CompletedProcess`` per process id.
    """
    import socket
    import subprocess

    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    procs = []
    try:
        for pid in range(n):
            e = dict(os.environ, JAX_PLATFORMS="cpu", TSJAX_COORDINATOR=f"localhost:{port}",
                     TSJAX_NUM_PROCESSES=str(n), TSJAX_PROCESS_ID=str(pid))
            e.pop("XLA_FLAGS", None)
            e.update(env or {})
            args = list(argv) + (list(per_process(pid)) if per_process else [])
            procs.append(subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e))
        done = []
        for p in procs:
            o, err = p.communicate(timeout=timeout)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, o, err))
        return done
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


@pytest.fixture
def launch_processes():
    """:func:`_launch_processes`: ``launch_processes(argv, n=2, env=..., per_process=..., timeout=...)``."""
    return _launch_processes
