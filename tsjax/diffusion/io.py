"""Save / load tsjax's own parameter trees with orbax-checkpoint (``StandardCheckpointer``).

A parameter checkpoint is one orbax checkpoint directory holding a nested ``dict`` of arrays (Flax
``params`` trees, or a dict of several of them such as ``{"unet": ..., "vae": ..., "text_encoder": ...}``).
Leaves are written from host memory (``numpy``), so a checkpoint does not record any device or sharding
and loads on whatever backend reads it; dtypes are kept as stored (float32, bfloat16 via ``ml_dtypes``,
integers).

    save_params("out/params", {"unet": unet_params, "vae": vae_params})
    params = load_params("out/params")                      # the tree as saved (jax arrays)
    params = load_params("out/params", target=template)     # checked against a template tree

``target`` may hold arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape`` of a Flax ``init``):
its paths and shapes are checked against the checkpoint *before* reading any tensor, and the loaded
arrays are cast to its dtypes. A missing path raises ``FileNotFoundError``; a folder that is not a
parameter checkpoint, a missing or unexpected parameter, or a shape mismatch raises ``ValueError``
naming the checkpoint, the parameter path (``a/b/kernel``) and both shapes.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["save_params", "load_params", "params_metadata", "is_params_checkpoint"]

# Files orbax writes at the top of every checkpoint directory (either marks one).
_MARKERS = ("_CHECKPOINT_METADATA", "_METADATA")


def _checkpointer():
    import orbax.checkpoint as ocp

    return ocp.StandardCheckpointer()


def is_params_checkpoint(path: str | os.PathLike) -> bool:
    """True when ``path`` is a directory written by :func:`save_params` (an orbax checkpoint)."""
    p = Path(path)
    return p.is_dir() and any((p / m).is_file() for m in _MARKERS)


def _flat(tree: Mapping, what: str) -> dict[tuple[str, ...], Any]:
    if not isinstance(tree, Mapping):
        raise ValueError(f"{what}: expected a nested dict of arrays, got {type(tree).__name__}")
    flat = traverse_util.flatten_dict(dict(tree))
    for k in flat:
        if not all(isinstance(part, str) for part in k):
            raise ValueError(f"{what}: keys must be strings, got path {k!r}")
    return flat


def _name(path: tuple[str, ...]) -> str:
    return "/".join(path)


def save_params(path: str | os.PathLike, tree: Mapping, *, overwrite: bool = True) -> Path:
    """Write the nested dict of arrays ``tree`` as an orbax checkpoint directory at ``path``.

    Args:
      path: target directory (made absolute; parents created). An existing parameter checkpoint there is
        replaced when ``overwrite`` (default); any other existing file or folder is never touched
        (``ValueError``).
      tree: nested ``dict`` with string keys and array leaves (``jax.Array``, ``numpy`` or scalars);
        leaves keep their dtype and shape.
    Returns the absolute checkpoint path. Blocks until the checkpoint is committed on disk.
    """
    p = Path(path).expanduser().absolute()
    flat = _flat(tree, f"save_params({p})")
    if not flat:
        raise ValueError(f"save_params({p}): the parameter tree is empty")
    if p.exists():
        if not is_params_checkpoint(p):
            raise ValueError(f"{p}: exists and is not a parameter checkpoint; refusing to overwrite it")
        if not overwrite:
            raise ValueError(f"{p}: a parameter checkpoint already exists (overwrite=False)")
    p.parent.mkdir(parents=True, exist_ok=True)
    host = traverse_util.unflatten_dict({k: np.asarray(jax.device_get(v)) for k, v in flat.items()})
    with _checkpointer() as ck:
        ck.save(p, host, force=overwrite)
        ck.wait_until_finished()
    return p


def _require(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser().absolute()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such parameter checkpoint")
    if not is_params_checkpoint(p):
        raise ValueError(f"{p}: not a parameter checkpoint (no orbax {' / '.join(_MARKERS)} file)")
    return p


def params_metadata(path: str | os.PathLike) -> dict:
    """Shapes and dtypes stored in a checkpoint, as a nested dict of ``jax.ShapeDtypeStruct`` (reads no
    tensor data)."""
    p = _require(path)
    with _checkpointer() as ck:
        meta = ck.metadata(p).item_metadata
    tree = getattr(meta, "tree", meta)
    return jax.tree_util.tree_map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), dict(tree))


def _fmt(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_params(path: str | os.PathLike, target: Mapping | None = None) -> dict:
    """Read a checkpoint written by :func:`save_params` into a nested dict of ``jax.Array``.

    Args:
      path: the checkpoint directory.
      target: optional nested dict of arrays or ``jax.ShapeDtypeStruct`` with the expected paths and
        shapes; the checkpoint must hold exactly these paths with these shapes, and the result takes the
        target's dtypes. Without it the tree is returned as stored.
    Raises ``FileNotFoundError`` (no such path) or ``ValueError`` (not a checkpoint, missing/unexpected
    parameter, shape mismatch), naming the checkpoint and the parameter.
    """
    p = _require(path)
    stored = _flat(params_metadata(p), str(p))
    want = None
    if target is not None:
        want = _flat(target, f"load_params({p}) target")
        missing = sorted(_name(k) for k in want if k not in stored)
        extra = sorted(_name(k) for k in stored if k not in want)
        if missing:
            raise ValueError(f"{p}: {len(missing)} parameter(s) of the target missing from the checkpoint: "
                             f"{_fmt(missing)}")
        if extra:
            raise ValueError(f"{p}: {len(extra)} unexpected parameter(s) not in the target: {_fmt(extra)}")
        for k, t in want.items():
            if tuple(stored[k].shape) != tuple(np.shape(t)):
                raise ValueError(f"{p}: parameter {_name(k)!r} has shape {tuple(stored[k].shape)} in the "
                                 f"checkpoint, expected {tuple(np.shape(t))}")
    with _checkpointer() as ck:
        restored = _flat(ck.restore(p), str(p))
    out = {}
    for k, v in restored.items():
        dtype = want[k].dtype if want is not None else None
        out[k] = jnp.asarray(v, dtype=dtype)
    return traverse_util.unflatten_dict(out)
