"""Orbax save/restore of a whole training state, and a Ctrl-C handler that saves before exiting.

A "state" is any pytree of arrays (parameters, optimizer states, LoRA states, the step counter, PRNG
keys...). Typed PRNG key arrays (``jax.random.key``) are stored as their raw ``key_data`` and rewrapped
on restore with the implementation of the template's key, so a resumed run draws exactly the same
random numbers as an uninterrupted one.

Layout: ``<dir>/<step>/`` orbax checkpoints (the newest ``max_to_keep`` are kept) plus
``<dir>/meta.json`` holding whatever JSON metadata the caller attaches (e.g. the config, to refuse
resuming with a different one).
"""
from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterator

import jax
import numpy as np
import orbax.checkpoint as ocp

__all__ = ["Checkpointer", "save_on_interrupt", "state_is_alive"]


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _to_storable(state: Any) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.random.key_data(x) if _is_key(x) else x, state)


def _from_storable(stored: Any, template: Any) -> Any:
    def back(s, t):
        if _is_key(t):
            return jax.random.wrap_key_data(np.asarray(s), impl=jax.random.key_impl(t))
        return s

    return jax.tree_util.tree_map(back, stored, template)


def _abstract(x: Any) -> Any:
    if isinstance(x, (jax.Array, np.ndarray)):
        return jax.ShapeDtypeStruct(x.shape, x.dtype)
    return x


def state_is_alive(state: Any) -> bool:
    """False when any array of ``state`` was deleted (e.g. donated to a step that was interrupted)."""
    return not any(isinstance(x, jax.Array) and x.is_deleted() for x in jax.tree_util.tree_leaves(state))


class Checkpointer:
    """Save/restore states under ``directory`` (one sub-folder per step, newest ``max_to_keep`` kept).

    The checkpointer belongs to the calling process alone: in a multi-process run (``jax.distributed``)
    each process saves its own assets' host states, so orbax is told that this process is the only
    active one and the primary host of this directory (no cross-process barriers, which would otherwise
    wait for processes that never save here).
    """

    def __init__(self, directory: str | Path, *, max_to_keep: int = 2):
        self.directory = Path(directory).resolve()
        extra: dict[str, Any] = {"create": True}
        if jax.process_count() > 1:  # orbax refuses create=True with active_processes
            self.directory.mkdir(parents=True, exist_ok=True)
            extra["create"] = False
            pid = jax.process_index()
            extra["multiprocessing_options"] = ocp.options.MultiprocessingOptions(
                primary_host=pid, active_processes={pid}, barrier_sync_key_prefix=f"tsjax-{self.directory}")
        self._mngr = ocp.CheckpointManager(
            self.directory, options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, **extra))

    def save(self, step: int, state: Any, *, meta: dict | None = None) -> Path:
        """Blocking save of ``state`` at ``step`` (overwrites an existing checkpoint of that step)."""
        step = int(step)
        if step in self._mngr.all_steps():
            self._mngr.delete(step)
        self._mngr.save(step, args=ocp.args.StandardSave(_to_storable(state)), force=True)
        self._mngr.wait_until_finished()
        if meta is not None:
            (self.directory / "meta.json").write_text(json.dumps(meta, indent=1, default=str))
        return self.directory / str(step)

    def latest_step(self) -> int | None:
        """Newest saved step, or None."""
        return self._mngr.latest_step()

    def all_steps(self) -> list[int]:
        """Every saved step, ascending."""
        return sorted(int(s) for s in self._mngr.all_steps())

    def meta(self) -> dict | None:
        p = self.directory / "meta.json"
        return json.loads(p.read_text()) if p.is_file() else None

    def restore(self, template: Any, step: int | None = None) -> Any:
        """Restore into the structure/shapes/dtypes of ``template`` (a state built the same way).

        ``step`` defaults to the latest. Raises ``FileNotFoundError`` naming the folder when there is
        no checkpoint.
        """
        step = self.latest_step() if step is None else int(step)
        if step is None:
            raise FileNotFoundError(f"{self.directory}: no checkpoint to resume from")
        target = jax.tree_util.tree_map(_abstract, _to_storable(template))
        stored = self._mngr.restore(step, args=ocp.args.StandardRestore(target))
        return _from_storable(stored, template)

    def close(self) -> None:
        self._mngr.close()


@contextlib.contextmanager
def save_on_interrupt(save_fn: Callable[[], Any], *, exit_code: int = 130,
                      message: str = "interrupted: saved a checkpoint") -> Iterator[None]:
    """Run the body; on ``KeyboardInterrupt`` call ``save_fn()`` then exit with ``exit_code`` (130).

    ``save_fn`` should save the last *complete* state (see :func:`state_is_alive`: a state donated to
    an interrupted step is gone, keep the previous checkpoint then).
    """
    try:
        yield
    except KeyboardInterrupt:
        save_fn()
        print(message, file=sys.stderr)
        raise SystemExit(exit_code) from None
