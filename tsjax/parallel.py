"""Device meshes and shardings for optimising many assets at once.

tsjax scales stage 2 by optimising K assets together: every per-asset quantity (DMTet/material
parameters, optimiser states, LoRA states, rendered views, PRNG keys) carries a leading ``asset``
axis of size K, and the frozen weights shared by all assets (the prior UNets, the VAE, text
embeddings) are replicated. A per-asset step ``step(state, batch, key, *shared) -> (state, metrics)``
is ``vmap``-ed over that axis and jitted with explicit ``NamedSharding``s, so XLA's SPMD partitioner
runs K/N assets on each of N devices with no cross-device traffic in the hot loop (the only
collectives are the ones the user asks for, e.g. a metrics mean).

Mesh axes:
  ``asset``  assets are split over this axis (data parallel over assets). This is what the pipeline
             uses: ``python -m tsjax.optimize --devices N --num-assets K`` (K a multiple of N) runs the K
             assets' stage 2 as one loop, K/N assets per device
             (:func:`tsjax.theme.stage2.make_sharded_step`, :func:`tsjax.theme.pipeline.run`).
  ``view``   second axis reserved for splitting the views of one asset over devices; size 1 by default.
             What exists: :func:`make_mesh` builds it and :func:`sharded_asset_step` replicates the
             per-asset data along it. What does not: no step splits its view batch over it (that needs
             a ``psum`` of the per-view gradients inside the step), so ``views_per_asset > 1`` only
             duplicates work and the pipeline always uses 1.

Multi-host (multi-controller JAX): ``python -m tsjax.optimize`` calls :func:`initialize_distributed`
before any other JAX call when the ``TSJAX_*`` variables below are set; then ``jax.devices()`` lists the
devices of every process and :func:`make_mesh` builds a global mesh. Each process prepares and feeds
only the assets whose shards live on its own devices (:func:`process_asset_indices`,
:func:`shard_local_assets`), reads back only those (:func:`local_asset_rows`), and replicated weights
are built from each process's identical host copy (:func:`replicate`). The sharded step itself has no
collectives, so processes never wait for each other inside the stage-2 loop. Typical launch (2 hosts x
8 GPUs, ``--out`` on a filesystem every host sees)::

    TSJAX_COORDINATOR=host0:1234 TSJAX_NUM_PROCESSES=2 TSJAX_PROCESS_ID=$RANK \\
        python -m tsjax.optimize --devices 16 --num-assets 16 --out /shared/runs/x ...

What the pipeline does with several processes (:func:`tsjax.theme.pipeline.run`): process 0 runs the
shared stages (exemplar renders, theme prior, concept images, reference prior) and caches them under
``--out``; the others wait at a barrier and load them; every process then runs its own assets' concept
priors, init models and the stage-2 loop; process 0 writes the gallery and manifest after a final
barrier. ``--devices`` must then be the global device count. On CPU the processes talk through gloo
(set here), which is how the tests run two processes on one machine. Under SLURM / Open MPI / Cloud TPU,
``TSJAX_COORDINATOR=auto`` lets ``jax.distributed.initialize()`` detect the cluster itself.

CPU testing: ``XLA_FLAGS=--xla_force_host_platform_device_count=4`` (set before importing jax) gives
four host devices, which is how the sharding tests run.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

ASSET = "asset"
VIEW = "view"

__all__ = [
    "ASSET",
    "VIEW",
    "make_mesh",
    "asset_sharding",
    "replicated",
    "shard_assets",
    "replicate",
    "stack_assets",
    "unstack_assets",
    "sharded_asset_step",
    "initialize_distributed",
    "process_asset_indices",
    "shard_local_assets",
    "local_asset_rows",
    "barrier",
    "min_over_processes",
    "PeerLostError",
]


def make_mesh(num_devices: int | None = None, *, views_per_asset: int = 1,
              devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 2-D device mesh ``(asset, view)`` of shape ``(num_devices // views_per_asset, views_per_asset)``.

    Args:
      num_devices: how many devices to use (default: all of ``jax.devices()``).
      views_per_asset: size of the ``view`` axis; must divide ``num_devices``.
      devices: explicit device list (default ``jax.devices()``, i.e. every host's devices).

    Raises:
      ValueError: more devices requested than available, or ``views_per_asset`` not a divisor.
    """
    avail = list(devices) if devices is not None else jax.devices()
    n = len(avail) if num_devices is None else int(num_devices)
    if n < 1:
        raise ValueError(f"--devices must be >= 1, got {n}")
    if n > len(avail):
        raise ValueError(
            f"--devices {n} requested but only {len(avail)} {avail[0].platform} device(s) are visible "
            "(on CPU, set XLA_FLAGS=--xla_force_host_platform_device_count=N before starting Python)")
    if views_per_asset < 1 or n % views_per_asset:
        raise ValueError(f"views_per_asset={views_per_asset} must divide the device count {n}")
    grid = np.asarray(avail[:n], dtype=object).reshape(n // views_per_asset, views_per_asset)
    return Mesh(grid, (ASSET, VIEW))


def asset_sharding(mesh: Mesh) -> NamedSharding:
    """Sharding that splits axis 0 (the asset axis) over the mesh's ``asset`` axis."""
    return NamedSharding(mesh, P(ASSET))


def replicated(mesh: Mesh) -> NamedSharding:
    """Sharding that keeps a full copy on every device (frozen shared weights)."""
    return NamedSharding(mesh, P())


def _is_key(x: Any) -> bool:
    return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def _check_asset_axis(tree: Any, mesh: Mesh) -> int:
    leaves = jax.tree.leaves(tree)
    if not leaves:
        return 0
    k = {np.shape(x)[0] if np.ndim(x) else None for x in leaves}
    if None in k or len(k) != 1:
        raise ValueError(f"every per-asset leaf needs the same leading asset axis; got leading sizes {sorted(map(str, k))}")
    (k,) = k
    n = mesh.shape[ASSET]
    if k % n:
        raise ValueError(f"{k} assets cannot be split evenly over {n} devices on the '{ASSET}' axis; "
                         f"use a multiple of {n} assets")
    return k


def shard_assets(tree: Any, mesh: Mesh) -> Any:
    """``device_put`` every leaf of ``tree`` (leading axis = assets) split over the ``asset`` axis."""
    _check_asset_axis(tree, mesh)
    return jax.device_put(tree, asset_sharding(mesh))


def _global_leaf(x: Any, sharding: NamedSharding, shape: tuple[int, ...], local_rows: Sequence[int] | None):
    """One leaf as a global array: ``x`` holds the whole array (``local_rows is None``) or, stacked in
    order, the rows ``local_rows`` of axis 0 (this process's assets). Typed PRNG keys go through their
    raw key data."""
    if _is_key(x):
        raw = jax.random.key_data(x)
        data = _global_leaf(raw, sharding, shape + raw.shape[x.ndim:], local_rows)
        return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
    host = np.asarray(x)
    if local_rows is None:
        return jax.make_array_from_callback(shape, sharding, lambda idx: host[idx])
    where = {k: i for i, k in enumerate(local_rows)}

    def rows(idx):
        sl = idx[0]
        ks = range(*sl.indices(shape[0]))
        return host[[where[k] for k in ks]][(slice(None),) + tuple(idx[1:])]

    return jax.make_array_from_callback(shape, sharding, rows)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Every leaf of ``tree`` replicated over the whole mesh.

    Multi-host safe: each process passes its own (identical) host copy and only its addressable devices
    are written (``jax.make_array_from_callback``), so no process needs another's data.
    """
    sh = replicated(mesh)
    if jax.process_count() == 1:
        return jax.device_put(tree, sh)
    return jax.tree.map(lambda x: _global_leaf(x, sh, tuple(np.shape(x)), None), tree)


def process_asset_indices(mesh: Mesh, num_assets: int, process_index: int | None = None) -> list[int]:
    """The asset indices (rows of the asset axis) whose shards live on devices of ``process_index``
    (default: this process), sorted. With one process: ``range(num_assets)``."""
    if num_assets % mesh.shape[ASSET]:
        raise ValueError(f"{num_assets} assets cannot be split evenly over {mesh.shape[ASSET]} devices on the "
                         f"'{ASSET}' axis; use a multiple of {mesh.shape[ASSET]} assets")
    pid = jax.process_index() if process_index is None else process_index
    rows: set[int] = set()
    for dev, idx in asset_sharding(mesh).devices_indices_map((num_assets,)).items():
        if dev.process_index == pid:
            rows.update(range(*idx[0].indices(num_assets)))
    return sorted(rows)


def shard_local_assets(local_trees: Sequence[Any], mesh: Mesh, num_assets: int) -> Any:
    """Global arrays (leading asset axis ``num_assets``, split over ``asset``) from this process's assets.

    ``local_trees[i]`` is the pytree of asset ``process_asset_indices(mesh, num_assets)[i]``; with one
    process this is :func:`shard_assets` of :func:`stack_assets`. Every process calls it with its own
    assets (same structure and leaf shapes on every process)."""
    mine = process_asset_indices(mesh, num_assets)
    if len(local_trees) != len(mine):
        raise ValueError(f"this process holds assets {mine} of {num_assets} but {len(local_trees)} were given")
    if jax.process_count() == 1:
        return shard_assets(stack_assets(local_trees), mesh)
    stacked = stack_assets(local_trees)
    sh = asset_sharding(mesh)
    return jax.tree.map(lambda x: _global_leaf(x, sh, (num_assets,) + tuple(np.shape(x))[1:], mine), stacked)


def local_asset_rows(tree: Any) -> list[Any]:
    """This process's assets of a tree of asset-sharded global arrays, as host pytrees in asset order
    (:func:`unstack_assets` of the addressable rows; with one process, of every row)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return []
    if all(getattr(x, "is_fully_addressable", True) for x in leaves):
        return unstack_assets(tree)
    cols = []
    for x in leaves:
        key = _is_key(x)
        data = jax.random.key_data(x) if key else x
        got: dict[int, np.ndarray] = {}
        for s in data.addressable_shards:
            start = s.index[0].start or 0
            for j, row in enumerate(np.asarray(s.data)):
                got[start + j] = row
        rows = [got[k] for k in sorted(got)]
        cols.append([jax.random.wrap_key_data(r, impl=jax.random.key_impl(x)) for r in rows] if key else rows)
    return [jax.tree.unflatten(treedef, [c[i] for c in cols]) for i in range(len(cols[0]))]


class PeerLostError(RuntimeError):
    """A barrier or gather of a multi-process run failed: another process of the run exited or crashed."""


def _collective(name: str, fn: Callable[[], Any]) -> Any:
    try:
        return fn()
    except Exception as e:  # gloo/NCCL/coordination-service errors surface as ValueError/RuntimeError
        raise PeerLostError(f"multi-process barrier {name!r} failed: another process of this run stopped "
                            f"(see its output for the cause); this process stops too ({e})") from e


def barrier(name: str) -> None:
    """Wait until every process reaches ``barrier(name)`` (no-op with one process).

    Raises :class:`PeerLostError` when another process has exited."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        _collective(name, lambda: multihost_utils.sync_global_devices(name))


def min_over_processes(value: int) -> int:
    """The minimum of an integer over all processes (itself with one process)."""
    if jax.process_count() == 1:
        return int(value)
    from jax.experimental import multihost_utils

    return int(np.min(_collective("min_over_processes",
                                  lambda: multihost_utils.process_allgather(np.asarray(value, np.int64)))))


def stack_assets(trees: Sequence[Any]) -> Any:
    """Stack K per-asset pytrees (same structure) into one pytree with a leading asset axis."""
    if not trees:
        raise ValueError("stack_assets needs at least one asset")

    def stack(*xs):
        if any(_is_key(x) for x in xs):  # typed PRNG keys cannot go through numpy
            return jnp.stack(xs)
        return np.stack([np.asarray(x) for x in xs])

    return jax.tree.map(stack, *trees)


def unstack_assets(tree: Any) -> list[Any]:
    """Inverse of :func:`stack_assets`: a list of K per-asset pytrees (numpy, on host)."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return []
    host = [x if _is_key(x) else np.asarray(x) for x in leaves]
    return [jax.tree.unflatten(treedef, [x[i] for x in host]) for i in range(host[0].shape[0])]


def sharded_asset_step(step: Callable[..., tuple[Any, Any]], mesh: Mesh, *, num_shared: int = 0,
                       donate_state: bool = True) -> Callable[..., tuple[Any, Any]]:
    """Lift a single-asset step to K assets sharded over ``mesh``.

    Args:
      step: ``step(state, batch, key, *shared) -> (state, metrics)`` for ONE asset: ``state``,
        ``batch`` and ``key`` are per-asset pytrees, ``shared`` are frozen pytrees common to all
        assets (prior weights...). Must be a pure function.
      mesh: from :func:`make_mesh`.
      num_shared: how many trailing ``shared`` arguments the step takes.
      donate_state: donate the stacked state buffers (the step updates them in place).

    Returns:
      A jitted ``multi_step(states, batches, keys, *shared) -> (states, metrics)`` where every
      per-asset argument/result has a leading asset axis of size K (a multiple of the ``asset``
      axis size), split over devices (``P("asset")``); ``shared`` arguments are replicated
      (``P()``). It compiles once per set of input shapes (the caller keeps shapes static).

    Implementation: ``jax.shard_map`` over the ``asset`` axis of a ``vmap`` of ``step``: every device
    runs the single-asset program on its own K/N assets (vectorised), so no collective is ever
    inserted, and custom calls in the step (the native rasterizer's XLA FFI kernels, which the SPMD
    partitioner cannot split) run locally on each device's shard. On the ``view`` axis the per-asset
    data are replicated (each view-group device of an asset computes the same asset; see the module
    docstring).
    """
    vstep = jax.vmap(step, in_axes=(0, 0, 0) + (None,) * num_shared, out_axes=(0, 0))
    per_asset, rep = P(ASSET), P()
    local = jax.shard_map(vstep, mesh=mesh, in_specs=(per_asset, per_asset, per_asset) + (rep,) * num_shared,
                          out_specs=(per_asset, per_asset), check_vma=False)
    return jax.jit(local, donate_argnums=(0,) if donate_state else ())


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None) -> bool:
    """Multi-host start-up: ``jax.distributed.initialize`` from arguments or environment.

    Reads ``TSJAX_COORDINATOR`` (``host:port``), ``TSJAX_NUM_PROCESSES`` and ``TSJAX_PROCESS_ID`` when the
    arguments are omitted. ``TSJAX_COORDINATOR=auto`` (the other two unset) calls
    ``jax.distributed.initialize()`` without arguments, which detects SLURM, Open MPI and Cloud TPU
    launches itself. With none of them set, does nothing and returns False (single-host run). Returns
    True when the distributed runtime was initialised.
    """
    addr = coordinator_address or os.environ.get("TSJAX_COORDINATOR")
    nproc = num_processes if num_processes is not None else os.environ.get("TSJAX_NUM_PROCESSES")
    pid = process_id if process_id is not None else os.environ.get("TSJAX_PROCESS_ID")
    if addr is None and nproc is None and pid is None:
        return False
    if addr == "auto" and nproc is None and pid is None:
        kwargs = {}  # cluster auto-detection (raises when it finds no cluster)
    else:
        if addr is None or nproc is None or pid is None:
            raise ValueError("multi-host needs all of TSJAX_COORDINATOR, TSJAX_NUM_PROCESSES and TSJAX_PROCESS_ID "
                             f"(got coordinator={addr!r}, num_processes={nproc!r}, process_id={pid!r})")
        try:
            nproc, pid = int(nproc), int(pid)
        except ValueError:
            raise ValueError(f"TSJAX_NUM_PROCESSES={nproc!r} and TSJAX_PROCESS_ID={pid!r} must be integers") from None
        if not 0 <= pid < nproc:
            raise ValueError(f"TSJAX_PROCESS_ID={pid} must be in [0, TSJAX_NUM_PROCESSES={nproc})")
        kwargs = dict(coordinator_address=addr, num_processes=nproc, process_id=pid)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU barriers/gathers across processes
    jax.distributed.initialize(**kwargs)
    barrier("tsjax-initialized")  # connects the processes now: a peer lost later fails barriers at once
    return True
