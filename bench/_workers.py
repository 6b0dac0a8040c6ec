"""Benchmark workers driven over stdin/stdout, and interleaved timing of several of them.

Why interleave: the CPU speed of the shared machines these benchmarks run on drifts by up to 2.5x within
seconds (a fixed 1024^2 matmul measured 16-43 ms over 40 s on an otherwise idle machine, 2026-12-06), so
timing one framework after the other compares two machine states. Each framework therefore runs in its
own worker process (its own memory high-water mark; the two never hold a model in the same process),
compiled and warmed up first, and the parent then asks the workers for one step each, round after round,
alternating which goes first; ratios are taken per round and summarised by their median.

Worker side: set up, ``emit_result(setup_record)``, then :func:`serve` the ``step`` / ``finish``
commands. Parent side: :class:`Worker` and :func:`interleave`.
"""
from __future__ import annotations

import json
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable


def status_mb(field: str) -> float:
    """``field`` (``VmRSS``, ``VmHWM``) of /proc/self/status in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024.0
    return float("nan")


def reset_peak() -> bool:
    """Reset this process's VmHWM to its current RSS (``/proc/self/clear_refs`` "5"); False if refused."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def available_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024.0**2
    return float("nan")


def emit_result(rec: dict) -> None:
    print("RESULT " + json.dumps(rec), flush=True)


def serve(step: Callable[[], None], rss0: float, reset_ok: bool, finish_extra: Callable[[], dict] | None = None):
    """Worker loop: ``step`` runs ``step()`` and answers ``{"t": seconds}``; ``finish`` answers the peak
    memory (``peak_rss_mb`` = VmHWM, ``step_mem_mb`` = VmHWM - ``rss0``, ``peak_reset``, plus
    ``finish_extra()``) and returns."""
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "step":
            t0 = time.perf_counter()
            step()
            emit_result({"t": time.perf_counter() - t0})
        elif cmd == "finish":
            hwm = status_mb("VmHWM")
            emit_result({"peak_rss_mb": round(hwm, 1), "step_mem_mb": round(hwm - rss0, 1), "peak_reset": reset_ok,
                         **(finish_extra() if finish_extra else {})})
            return


def _rss_mb(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024.0
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


class Worker:
    """A worker subprocess (``python script --worker ARGV``) driven over stdin/stdout (``RESULT {json}``
    lines); stderr goes to a log file. With ``max_rss_mb`` a guard thread kills it when its resident set
    exceeds that or the machine's available memory drops under 1 GiB (the machine is shared); the next
    read then raises ``RuntimeError`` naming the reason."""

    def __init__(self, script: Path, name: str, argv: list[str], env: dict, logdir: Path,
                 max_rss_mb: float | None = None):
        self.name = name
        self.killed: str | None = None
        self.log = logdir / (name.replace(":", "_").replace("/", "_") + ".log")
        self.proc = subprocess.Popen([sys.executable, str(script), "--worker", *argv],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log.open("w"),
                                     text=True, env=env)
        if max_rss_mb is not None:
            threading.Thread(target=self._guard, args=(max_rss_mb,), daemon=True).start()

    def _guard(self, max_rss_mb: float) -> None:
        while self.proc.poll() is None:
            rss = _rss_mb(self.proc.pid)
            if rss > max_rss_mb:
                self.killed = f"memory guard: worker RSS {rss:.0f} MiB > limit {max_rss_mb:.0f} MiB"
            elif available_gb() < 1.0:
                self.killed = f"memory guard: machine available memory < 1 GiB (worker RSS {rss:.0f} MiB)"
            if self.killed:
                self.proc.kill()
                return
            time.sleep(0.25)

    def read(self) -> dict:
        for line in self.proc.stdout:
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        self.proc.wait()
        tail = self.log.read_text().strip().splitlines()[-3:]
        raise RuntimeError(self.killed or f"{self.name} exited with {self.proc.returncode}: {' | '.join(tail)[-600:]}")

    def ask(self, cmd: str) -> dict:
        try:
            self.proc.stdin.write(cmd + "\n")
            self.proc.stdin.flush()
        except OSError:
            pass  # the worker is gone: read() says why
        return self.read()

    def close(self) -> None:
        try:
            if self.proc.stdin:
                self.proc.stdin.close()
        except OSError:
            pass
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def interleave(workers: dict[str, Worker], rounds: int, on_round: Callable[[], None] | None = None) -> dict[str, list[float]]:
    """``rounds`` rounds of one ``step`` per worker; the order rotates every round (so no worker always
    runs right after another). Returns the step times per worker name."""
    names = list(workers)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds if names else 0):
        k = r % len(names)
        for n in names[k:] + names[:k]:
            times[n].append(workers[n].ask("step")["t"])
        if on_round:
            on_round()
    return times


def ratio_summary(a: list[float], b: list[float]) -> dict:
    """``a`` over ``b``: ratio of medians, of minima, and the median of the per-round ratios."""
    return {"ratio_median": round(statistics.median(a) / statistics.median(b), 3),
            "ratio_min": round(min(a) / min(b), 3),
            "per_round_ratio_median": round(statistics.median([x / y for x, y in zip(a, b)]), 3)}
