"""Tetrahedral grids for DMTet, built procedurally (no downloaded files) and cached on disk.

Scheme: the Kuhn (Freudenthal) triangulation of a cube grid. The cube ``[-scale/2, scale/2]^3`` is split
into ``N^3`` cells (``N = resolution``) with ``(N+1)^3`` vertices; every cell is cut into 6 tetrahedra
along its main diagonal (corner (0,0,0) -> (1,1,1)); tet k of a cell is the monotone path
``0 -> e_a -> e_a + e_b -> (1,1,1)`` for the k-th permutation (a, b, c) of the axes. The split is the
same in every cell, so neighbouring cells share faces exactly (a conforming mesh). Every tetrahedron is
stored positively oriented (``det[v1-v0, v2-v0, v3-v0] > 0``), which the marching-tets triangle table
relies on for outward-facing triangles.

Counts (exact): vertices ``(N+1)^3``, tets ``6 N^3``, unique edges
``3 N (N+1)^2 + 3 N^2 (N+1) + N^3`` (axis edges, face diagonals, body diagonals). Examples:

  ====  ===========  ============  ============
   N     vertices      tets          edges
  ====  ===========  ============  ============
   32       35,937       196,608       238,688
   64      274,625     1,572,864     1,872,064
   97      941,192     5,476,038     6,473,683
  128    2,146,689    12,582,912    14,827,904
  192    7,189,057    42,467,328    49,877,568
  ====  ===========  ============  ============

The DMTet/threestudio "192" quartet grid of the paper (~0.94M vertices, ~5.1M tets) has the vertex
density of this grid at ``N = 97``; ``N = 192`` here means 192 cells per side (~7.6x as many vertices, ~8.3x as many tets).

Edges: the unique-edge table is computed in numpy at build time. In the Kuhn split every edge joins a
vertex ``p`` to ``p + o`` for one of 7 offsets ``o`` in {0,1}^3 \\ {0}, so edges are enumerated
analytically (no sort / ``np.unique`` over all tet edges). ``tet_edges [Nt, 6]`` maps the local edges
``(0,1), (0,2), (0,3), (1,2), (1,3), (2,3)`` of every tet to rows of ``edges``.

Cache: ``$TSJAX_CACHE/tets/`` (default ``~/.cache/tsjax/tets/``) holds one ``kuhn_N{N}.npz`` with the
integer tables; vertex positions are recomputed from ``scale`` on load.
"""
from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

__all__ = ["TetGrid", "build_tet_grid", "tet_grid", "grid_counts", "grid_bytes", "cache_dir", "LOCAL_EDGES",
           "tet_edge_table"]

# Local edges of a tetrahedron (pairs of local vertex indices), in the order used by ``tet_edges``.
LOCAL_EDGES = np.array([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], np.int32)
# The 7 edge offsets of the Kuhn grid (an edge is (p, p + o)).
_OFFSETS = np.array([[1, 0, 0], [0, 1, 0], [0, 0, 1], [1, 1, 0], [1, 0, 1], [0, 1, 1], [1, 1, 1]], np.int64)
_FORMAT_VERSION = 1


def _offset_id(o) -> int:
    return int(np.nonzero((_OFFSETS == np.asarray(o)).all(1))[0][0])


def _cell_template():
    """The 6 Kuhn tets of the unit cell: (corners [6, 4, 3] in {0,1}, local-edge (lower corner, offset id))."""
    tets = []
    for perm in itertools.permutations(range(3)):
        c = np.zeros((4, 3), np.int64)
        c[1, perm[0]] = 1
        c[2] = c[1]
        c[2, perm[1]] = 1
        c[3] = 1
        if np.linalg.det((c[1:] - c[0]).astype(np.float64)) < 0:
            c = c[[0, 1, 3, 2]]  # make it positively oriented
        tets.append(c)
    tets = np.stack(tets)
    edge_lower = np.zeros((6, 6, 3), np.int64)
    edge_off = np.zeros((6, 6), np.int64)
    for t in range(6):
        for e, (p, q) in enumerate(LOCAL_EDGES):
            a, b = tets[t, p], tets[t, q]
            lo = np.minimum(a, b)
            assert (np.maximum(a, b) - lo).sum() > 0 and ((a <= b).all() or (b <= a).all())
            edge_lower[t, e] = lo
            edge_off[t, e] = _offset_id(np.abs(b - a))
    return tets, edge_lower, edge_off


def grid_counts(resolution: int) -> dict[str, int]:
    """Exact counts for resolution N: ``{"verts", "tets", "edges"}``."""
    n = int(resolution)
    return {"verts": (n + 1) ** 3, "tets": 6 * n ** 3, "edges": 3 * n * (n + 1) ** 2 + 3 * n * n * (n + 1) + n ** 3}


def grid_bytes(resolution: int) -> int:
    """Estimated peak host bytes to build (and hold) the grid tables of resolution N.

    Tables: verts f32 [Nv,3], tets i32 [Nt,4], edges i32 [Ne,2], tet_edges i32 [Nt,6]; build temporaries
    (int64 cell indices and the dense edge map) roughly double it.
    """
    c = grid_counts(resolution)
    tables = c["verts"] * 12 + c["tets"] * 16 + c["edges"] * 8 + c["tets"] * 24
    temporaries = c["verts"] * 7 * 8 + c["tets"] * 6 * 8 * 2
    return int(tables + temporaries)


def _available_bytes() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cache_dir() -> Path:
    """``$TSJAX_CACHE/tets`` or ``~/.cache/tsjax/tets``."""
    root = os.environ.get("TSJAX_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "tsjax") / "tets"


@jax.tree_util.register_pytree_node_class
@dataclass(frozen=True, eq=False)
class TetGrid:
    """A tetrahedral grid (a pytree: arrays are leaves, ``resolution``/``scale`` static).

    Attributes:
      verts: [Nv, 3] float32 rest positions in ``[-scale/2, scale/2]^3``.
      tets: [Nt, 4] int32, positively oriented.
      edges: [Ne, 2] int32 unique edges (``edges[:, 0] < edges[:, 1]``).
      tet_edges: [Nt, 6] int32 rows of ``edges`` for the local edges :data:`LOCAL_EDGES`.
      resolution: cells per side N (0 for a grid not built by :func:`build_tet_grid`).
      scale: side length of the grid cube (world units).
    """

    verts: np.ndarray
    tets: np.ndarray
    edges: np.ndarray
    tet_edges: np.ndarray
    resolution: int = field(default=0)
    scale: float = field(default=1.0)

    @property
    def cell_size(self) -> float:
        """Edge length of one grid cell (``scale / resolution``)."""
        return float(self.scale) / max(int(self.resolution), 1)

    def tree_flatten(self):
        return (self.verts, self.tets, self.edges, self.tet_edges), (self.resolution, self.scale)

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children, *aux)


def tet_edge_table(tets: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Unique edges of an arbitrary tet mesh (numpy, sort based): ``(edges [Ne,2], tet_edges [Nt,6])``."""
    tets = np.asarray(tets)
    if tets.ndim != 2 or tets.shape[1] != 4:
        raise ValueError(f"tet_edge_table: tets must have shape [Nt, 4], got {tets.shape}")
    e = tets[:, LOCAL_EDGES].reshape(-1, 2).astype(np.int64)
    e = np.sort(e, axis=1)
    key = e[:, 0] * (int(e.max()) + 1) + e[:, 1]
    uniq, inv = np.unique(key, return_inverse=True)
    first = np.zeros(len(uniq), np.int64)
    first[inv] = np.arange(len(key))
    return e[first].astype(np.int32), inv.reshape(-1, 6).astype(np.int32)


def _build_tables(n: int) -> dict[str, np.ndarray]:
    tmpl, edge_lower, edge_off = _cell_template()
    m = n + 1
    strides = np.array([m * m, m, 1], np.int64)
    # cells (i, j, k) with i along x
    ii, jj, kk = np.meshgrid(np.arange(n), np.arange(n), np.arange(n), indexing="ij")
    base = (ii * m * m + jj * m + kk).reshape(-1).astype(np.int64)  # [Nc]
    corner_off = (tmpl @ strides)  # [6, 4]
    tets = (base[:, None, None] + corner_off[None]).reshape(-1, 4).astype(np.int32)
    # dense edge ids: vertex p, offset o -> p * 7 + o, valid when p + o stays in the grid
    pi, pj, pk = np.meshgrid(np.arange(m), np.arange(m), np.arange(m), indexing="ij")
    pc = np.stack([pi.reshape(-1), pj.reshape(-1), pk.reshape(-1)], 1)
    valid = ((pc[:, None, :] + _OFFSETS[None]) <= n).all(-1)  # [Nv, 7]
    dense_to_edge = np.cumsum(valid.reshape(-1), dtype=np.int64) - 1
    vid = np.nonzero(valid.reshape(-1))[0]
    p0 = vid // 7
    edges = np.stack([p0, p0 + _OFFSETS[vid % 7] @ strides], 1).astype(np.int32)
    del valid, pc, pi, pj, pk
    lower_off = edge_lower @ strides  # [6, 6]
    dense = (base[:, None, None] + lower_off[None]) * 7 + edge_off[None]  # [Nc, 6, 6]
    tet_edges = dense_to_edge[dense].reshape(-1, 6).astype(np.int32)
    return {"tets": tets, "edges": edges, "tet_edges": tet_edges}


def _grid_verts(n: int, scale: float) -> np.ndarray:
    lin = np.linspace(-0.5, 0.5, n + 1, dtype=np.float64) * scale
    x, y, z = np.meshgrid(lin, lin, lin, indexing="ij")
    return np.stack([x.reshape(-1), y.reshape(-1), z.reshape(-1)], 1).astype(np.float32)


def build_tet_grid(resolution: int, *, scale: float = 1.0, cache: bool = True,
                   max_bytes: int | None = None) -> TetGrid:
    """Kuhn tet grid with N = ``resolution`` cells per side in ``[-scale/2, scale/2]^3`` (module docstring).

    Args:
      resolution: cells per side (int >= 1).
      scale: side length of the cube (default 1 -> bounds [-0.5, 0.5]^3).
      cache: read/write the integer tables under :func:`cache_dir` (npz).
      max_bytes: memory limit for the build; default: the machine's available RAM (MemAvailable).

    Raises:
      ValueError: bad resolution/scale, or the estimated memory (stated in bytes) exceeds the limit.
    """
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)) or resolution < 1:
        raise ValueError(f"tet_grid: resolution must be a positive integer, got {resolution!r}")
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError(f"tet_grid: scale must be a positive number, got {scale!r}")
    n = int(resolution)
    need = grid_bytes(n)
    limit = max_bytes if max_bytes is not None else _available_bytes()
    if limit is not None and need > limit:
        c = grid_counts(n)
        raise ValueError(f"tet_grid: resolution {n} needs ~{need / 2**30:.2f} GiB ({need} bytes) for "
                         f"{c['verts']} vertices / {c['tets']} tets, more than the limit of "
                         f"{limit / 2**30:.2f} GiB ({limit} bytes); use a smaller resolution")
    path = cache_dir() / f"kuhn_N{n}.npz"
    tables = None
    if cache and path.is_file():
        try:
            with np.load(path) as z:
                if int(z["version"]) == _FORMAT_VERSION:
                    tables = {k: z[k] for k in ("tets", "edges", "tet_edges")}
        except (OSError, KeyError, ValueError):
            tables = None  # corrupt/old cache file: rebuild and overwrite
    if tables is None:
        tables = _build_tables(n)
        if cache:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.npz")
            np.savez(tmp, version=np.int32(_FORMAT_VERSION), **tables)
            os.replace(tmp, path)
    return TetGrid(_grid_verts(n, float(scale)), tables["tets"], tables["edges"], tables["tet_edges"],
                   n, float(scale))


def tet_grid(resolution: int, *, scale: float = 1.0, cache: bool = True,
             max_bytes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(verts [Nv,3] float32, tets [Nt,4] int32)`` of :func:`build_tet_grid` (same arguments)."""
    g = build_tet_grid(resolution, scale=scale, cache=cache, max_bytes=max_bytes)
    return g.verts, g.tets
