"""Pin a benchmark worker to its share of the CPU cores, for both frameworks alike.

XLA:CPU does not honour a thread count the way ``torch.set_num_threads`` does: with
``--xla_cpu_multi_thread_eigen=false`` its matrix multiplies still run on every core (measured here:
2048^2 ``jnp.dot`` at 181 GFLOP/s and 1.97 CPU-seconds per second on 2 cores; pinned to one core
89 GFLOP/s, 1.00), so a "1 thread each" comparison against a 1-thread PyTorch would give tsjax twice
the hardware. Workers therefore restrict their CPU affinity to the first ``N`` cores of the parent's
set (``TSJAX_BENCH_CPUS=N``) before jax or torch is imported.
"""
from __future__ import annotations

import os

ENV = "TSJAX_BENCH_CPUS"


def pin_from_env() -> list[int] | None:
    """Apply ``TSJAX_BENCH_CPUS`` (if set) to this process; returns the cores in use (None: unpinned)."""
    n = os.environ.get(ENV)
    if not n or not hasattr(os, "sched_setaffinity"):
        return None
    have = sorted(os.sched_getaffinity(0))
    cpus = have[: max(1, min(int(n), len(have)))]
    os.sched_setaffinity(0, cpus)
    return cpus


def worker_env(env: dict, threads: int) -> dict:
    """``env`` for a worker given ``threads`` cores (both frameworks get the same)."""
    return dict(env, **{ENV: str(threads)})
