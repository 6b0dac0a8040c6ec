"""Persistent XLA compilation cache for the CLIs.

A tsjax run compiles a few hundred programs (prior training steps, samplers, the stage-2 step, the
export renders); on a 2-core CPU that is minutes of the tiny preset's wall time, and on a GPU the
paper-size stage-2 step alone takes a while to compile. With the cache, a second run of the same
shapes (``--resume``, a rerun with another seed or ``guidance.mode``, another asset) loads the
compiled executables from disk instead.

Location: ``--compile-cache DIR`` > ``$TSJAX_COMPILE_CACHE`` > ``$XDG_CACHE_HOME/tsjax/xla`` >
``~/.cache/tsjax/xla``. ``off`` (or ``none``/empty) disables it. Entries are keyed by JAX on the
program, the jax/jaxlib version, the backend and the compile options, so a stale entry is never used
for a different program; the folder can be deleted at any time.
"""
from __future__ import annotations

import os
from pathlib import Path

__all__ = ["default_cache_dir", "enable_compile_cache"]

_OFF = {"", "off", "none", "0", "false"}


def default_cache_dir() -> str | None:
    """The cache folder from the environment (see the module docstring), or None when disabled."""
    env = os.environ.get("TSJAX_COMPILE_CACHE")
    if env is not None:
        return None if env.strip().lower() in _OFF else env
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "tsjax" / "xla")


def enable_compile_cache(path: str | None, *, min_compile_time_s: float = 0.5) -> str | None:
    """Turn on JAX's persistent compilation cache in ``path`` (created if needed); ``None``/``"off"``
    leaves it off. Programs that compile in less than ``min_compile_time_s`` are not stored.

    Returns the folder in use, or None. Raises ``ValueError`` (one line) if ``path`` exists and is not a
    writable folder.
    """
    import jax

    if path is None or str(path).strip().lower() in _OFF:
        return None
    p = Path(path).expanduser()
    if p.exists() and not p.is_dir():
        raise ValueError(f"--compile-cache {p}: exists and is not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"--compile-cache {p}: cannot create the folder ({e.strerror})") from None
    if not os.access(p, os.W_OK):
        raise ValueError(f"--compile-cache {p}: folder is not writable")
    jax.config.update("jax_compilation_cache_dir", str(p))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", float(min_compile_time_s))
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    return str(p)
