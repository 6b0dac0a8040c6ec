"""Marching tetrahedra with static output shapes (differentiable w.r.t. SDF values and vertex positions).

Sign convention: ``sdf <= 0`` is inside, ``sdf > 0`` outside. Triangles are counter-clockwise seen from
outside, i.e. the face normal ``(v1 - v0) x (v2 - v0)`` points from negative to positive SDF.

Algorithm (everything has a static shape, so one compilation serves any surface):
  1. Edge crossings on the grid's precomputed unique edges: ``cross = (sdf[a] > 0) != (sdf[b] > 0)``;
     ``csum = cumsum(cross)`` numbers the crossing edges; surface vertex ``j`` lives on the crossing
     edge found by ``searchsorted(csum, j)`` (no scatter, no dynamic shapes). Its position is the linear
     zero crossing ``p = p_a + t (p_b - p_a)``, ``t = s_a / (s_a - s_b)`` of the (deformed) vertex
     positions; the denominator is never 0 on a crossing edge and is replaced by 1 elsewhere.
  2. Per tet a 4-bit case code (bit i = ``sdf[tet[i]] > 0``) gives 0, 1 or 2 triangles from a
     16-case table (:data:`TRI_TABLE`, built below from first principles and oriented on a positively
     oriented reference tet; the grid stores positively oriented tets). Faces are numbered by a cumsum of
     the per-tet triangle counts and gathered by ``searchsorted`` into ``max_faces`` slots.
  3. Unused slots (and faces whose vertex did not fit in ``max_verts``) are the degenerate face
     ``(0, 0, 0)`` with ``face_mask = False``; the rasterizer never draws zero-area faces. Unused vertex
     slots sit at the origin with ``vert_mask = False``.

Grids built by :func:`tsjax.geometry.tets.build_tet_grid` take a structured path (``_marching_kuhn``)
with bit-identical output: crossings and per-tet face slots are packed into 32-bit bitsets, the j-th
vertex / k-th face is found by rank/select on them (prefix sums over words, popcounts inside a word)
instead of full-length cumsums, and case codes / edge ids come from strided slices of the regular grid
instead of gathers through the ``tets`` / ``tet_edges`` tables (``bench/dmtet.py``).

Metrics: ``num_faces`` (faces stored), ``num_verts`` (vertices stored) and ``overflow`` (faces that
the surface has but that did not fit: ``total_faces - num_faces``; 0 when the buffers are large enough).
"""
from __future__ import annotations

import functools
import warnings
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Float, Int

from tsjax.geometry.tets import _OFFSETS, LOCAL_EDGES, TetGrid, _cell_template, tet_edge_table

__all__ = ["TriMesh", "marching_tets", "TRI_TABLE", "NUM_TRIS", "compact_mesh", "warn_if_degenerate"]


def _build_tri_table() -> tuple[np.ndarray, np.ndarray]:
    """Triangle table [16, 2, 3] of local edge ids (see :data:`tsjax.geometry.tets.LOCAL_EDGES`) and
    the triangle count per case [16]. Oriented so normals point towards the ``sdf > 0`` vertices of a
    positively oriented tet."""
    ref = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]], np.float64)  # det = +1
    eid = {tuple(sorted(map(int, e))): i for i, e in enumerate(LOCAL_EDGES)}

    def edge(a, b):
        return eid[(min(a, b), max(a, b))]

    table = np.zeros((16, 2, 3), np.int32)
    count = np.zeros(16, np.int32)
    for code in range(16):
        out = [i for i in range(4) if code >> i & 1]
        ins = [i for i in range(4) if not code >> i & 1]
        if len(out) in (0, 4):
            continue
        if len(out) in (1, 3):
            lone, others = (out[0], ins) if len(out) == 1 else (ins[0], out)
            tris = [[edge(lone, o) for o in others]]
        else:
            (i0, i1), (o0, o1) = ins, out
            q = [edge(i0, o0), edge(i1, o0), edge(i1, o1), edge(i0, o1)]  # a cycle around the quad
            tris = [[q[0], q[1], q[2]], [q[0], q[2], q[3]]]
        d = ref[out].mean(0) - ref[ins].mean(0)
        for s, tri in enumerate(tris):
            p = np.array([ref[LOCAL_EDGES[e]].mean(0) for e in tri])
            if np.dot(np.cross(p[1] - p[0], p[2] - p[0]), d) < 0:
                tri = [tri[0], tri[2], tri[1]]
            table[code, s] = tri
        count[code] = len(tris)
    return table, count


TRI_TABLE, NUM_TRIS = _build_tri_table()


class TriMesh(NamedTuple):
    """Fixed-capacity triangle mesh (a pytree).

    Attributes:
      verts: [max_verts, 3] float32 positions (origin in unused slots).
      faces: [max_faces, 3] int32 vertex indices (``(0, 0, 0)`` in unused slots), CCW seen from outside.
      face_mask: [max_faces] bool, True for stored faces (always a prefix of the buffer).
      vert_mask: [max_verts] bool, True for stored vertices (a prefix).
      num_faces: int32 scalar, number of stored faces.
      num_verts: int32 scalar, number of stored vertices.
      overflow: int32 scalar, faces of the surface that did not fit (0 when the capacity suffices).
    """

    verts: Float[Array, "v 3"]
    faces: Int[Array, "f 3"]
    face_mask: Bool[Array, " f"]
    vert_mask: Bool[Array, " v"]
    num_faces: Int[Array, ""]
    num_verts: Int[Array, ""]
    overflow: Int[Array, ""]


@functools.partial(jax.jit, static_argnames=("max_faces", "max_verts"))
def _marching(verts, sdf, tets, edges, tet_edges, *, max_faces: int, max_verts: int) -> TriMesh:
    n_edges = edges.shape[0]
    n_tets = tets.shape[0]
    occ = sdf > 0
    # 1. surface vertices on crossing edges
    cross = occ[edges[:, 0]] != occ[edges[:, 1]]
    csum_e = jnp.cumsum(cross.astype(jnp.int32))
    total_v = csum_e[-1]
    j = jnp.arange(max_verts, dtype=jnp.int32)
    vedge = jnp.minimum(jnp.searchsorted(csum_e, j, side="right"), n_edges - 1)
    vmask = j < total_v
    a, b = edges[vedge, 0], edges[vedge, 1]
    sa, sb = sdf[a], sdf[b]
    den = sa - sb
    den = jnp.where(vmask & (den != 0), den, 1.0)
    t = jnp.where(vmask, sa / den, 0.0)
    pa, pb = verts[a], verts[b]
    pos = jnp.where(vmask[:, None], pa + t[:, None] * (pb - pa), 0.0)
    # 2. triangles per tet
    weights = jnp.array([1, 2, 4, 8], jnp.int32)
    code = jnp.sum(occ[tets].astype(jnp.int32) * weights, axis=1)
    ntri = jnp.asarray(NUM_TRIS)[code]
    csum_t = jnp.cumsum(ntri)
    total_f = csum_t[-1]
    k = jnp.arange(max_faces, dtype=jnp.int32)
    ft = jnp.minimum(jnp.searchsorted(csum_t, k, side="right"), n_tets - 1)
    slot = jnp.clip(k - (csum_t[ft] - ntri[ft]), 0, 1)
    local = jnp.asarray(TRI_TABLE)[code[ft], slot]  # [F, 3] local edge ids
    gedge = jnp.take_along_axis(tet_edges[ft], local, axis=1)  # [F, 3] grid edge ids
    vidx = csum_e[gedge] - 1
    fmask = (k < total_f) & jnp.all(vidx < max_verts, axis=1)
    faces = jnp.where(fmask[:, None], vidx, 0).astype(jnp.int32)
    num_faces = jnp.sum(fmask.astype(jnp.int32))
    num_verts = jnp.minimum(total_v, max_verts).astype(jnp.int32)
    return TriMesh(pos, faces, fmask, vmask, num_faces, num_verts, (total_f - num_faces).astype(jnp.int32))


# Kuhn-grid structure (see tsjax.geometry.tets): the 6 tets of a cell as corner ids in the cube (corner
# c = 4 cx + 2 cy + cz), and each local edge as (lower corner id, offset id of the 7 edge offsets).
_TMPL, _EDGE_LOWER, _EDGE_OFF = _cell_template()
_TET_CORNER_ID = (_TMPL @ np.array([4, 2, 1])).astype(np.int32)  # [6, 4]
_EDGE_LOWER_ID = (_EDGE_LOWER @ np.array([4, 2, 1])).astype(np.int32)  # [6, 6]
_EDGE_OFF_ID = _EDGE_OFF.astype(np.int32)  # [6, 6]


def _pack_lanes(vals, bits: int):
    """uint32 lanes [N] (each < 2**bits, 32 % bits == 0) -> uint32 words [ceil(N * bits / 32)]: lane i
    of word g is ``vals[g * 32 / bits + i]`` at bit offset ``i * bits`` (so bit ``bits * n + b`` of the
    bitset is bit ``b`` of ``vals[n]``)."""
    per = 32 // bits
    pad = (-vals.shape[0]) % per
    v = jnp.pad(vals, (0, pad)).reshape(-1, per)
    return jnp.sum(v << (bits * jnp.arange(per, dtype=jnp.uint32)), axis=1, dtype=jnp.uint32)


def _low_mask(k):
    """uint32 mask of the ``k`` lowest bits (k in [0, 31])."""
    return (jnp.uint32(1) << k.astype(jnp.uint32)) - jnp.uint32(1)


class _Bitset(NamedTuple):
    """A packed bitset with a rank table: ``excl[g]`` = set bits in words before ``g``."""

    words: jnp.ndarray
    incl: jnp.ndarray
    excl: jnp.ndarray

    @classmethod
    def build(cls, words):
        cnt = jax.lax.population_count(words).astype(jnp.int32)
        incl = jnp.cumsum(cnt)
        return cls(words, incl, incl - cnt)

    @property
    def total(self):
        return self.incl[-1]

    def rank(self, d):
        """Number of set bits before position ``d`` (int32 array of positions)."""
        g = d >> 5
        return self.excl[g] + jax.lax.population_count(self.words[g] & _low_mask(d & 31)).astype(jnp.int32)

    def select(self, j):
        """Position of the ``j``-th set bit (0-based; garbage, but in range, for ``j >= total``)."""
        g = jnp.minimum(jnp.searchsorted(self.incl, j, side="right"), self.words.shape[0] - 1)
        r = j - self.excl[g]
        w = self.words[g]
        lo = jnp.zeros_like(j)
        for step in (16, 8, 4, 2, 1):  # largest lo with popcount(bits below lo) <= r
            ok = jax.lax.population_count(w & _low_mask(lo + step)).astype(jnp.int32) <= r
            lo = jnp.where(ok, lo + step, lo)
        return g * 32 + lo


@functools.partial(jax.jit, static_argnames=("n", "max_faces", "max_verts"))
def _marching_kuhn(verts, sdf, *, n: int, max_faces: int, max_verts: int) -> TriMesh:
    """:func:`_marching` specialised to the Kuhn grid of ``n`` cells per side (same output, bit for bit).

    The grid's regular structure replaces the table gathers and the two full-length prefix sums:
      * edge crossings are computed densely per (grid vertex p, edge offset o), bit ``8 p + o`` of a
        packed bitset (one byte per vertex, bit 7 unused; offsets leaving the grid never cross, so the
        order of the crossings, hence the vertex numbering, equals that of the stored edge table);
      * the per-tet case codes come from the 8 shifted corner-occupancy volumes of the cells (strided
        slices), and every tet owns 2 face slots (bit ``2 t + s`` set when the tet has > s triangles);
      * the j-th surface vertex / k-th face is found by a *select* on the bitset (binary search in the
        per-word prefix counts, then within the 32-bit word with popcounts), and a face corner's vertex
        index is the *rank* of its grid edge, whose id follows from the cell coordinates and the cell
        template. Only per-word counts (1/32 of the bits) are prefix-summed.
    """
    m = n + 1
    occ3 = (sdf > 0).reshape(m, m, m)
    ebyte = jnp.zeros((m, m, m), jnp.uint32)
    for oi, o in enumerate(_OFFSETS):
        ox, oy, oz = (int(c) for c in o)
        c = occ3[: m - ox, : m - oy, : m - oz] != occ3[ox:, oy:, oz:]
        ebyte = ebyte | (jnp.pad(c, ((0, ox), (0, oy), (0, oz))).astype(jnp.uint32) << oi)
    ebits = _Bitset.build(_pack_lanes(ebyte.reshape(-1), 8))  # bit 8 p + o
    total_v = ebits.total
    j = jnp.arange(max_verts, dtype=jnp.int32)
    vmask = j < total_v
    d = jnp.where(vmask, ebits.select(j), 0)
    strides = jnp.asarray(np.append(_OFFSETS @ np.array([m * m, m, 1]), 0), jnp.int32)  # [8]
    a = d >> 3
    b = jnp.where(vmask, a + strides[d & 7], a)
    sa, sb = sdf[a], sdf[b]
    den = sa - sb
    den = jnp.where(vmask & (den != 0), den, 1.0)
    t = jnp.where(vmask, sa / den, 0.0)
    pa, pb = verts[a], verts[b]
    pos = jnp.where(vmask[:, None], pa + t[:, None] * (pb - pa), 0.0)
    # case codes [n, n, n, 6] in the order of TetGrid.tets (cell-major, then the 6 template tets)
    corner = [occ3[(c >> 2) & 1: ((c >> 2) & 1) + n, (c >> 1) & 1: ((c >> 1) & 1) + n, c & 1: (c & 1) + n]
              .astype(jnp.uint8) for c in range(8)]
    code = jnp.stack([sum(corner[int(_TET_CORNER_ID[tt, k])] << k for k in range(4)) for tt in range(6)], -1)
    code = code.reshape(-1)  # [Nt] uint8
    pc = jax.lax.population_count(code)
    slots = jnp.where(pc == 2, 3, jnp.where((pc == 1) | (pc == 3), 1, 0)).astype(jnp.uint32)  # 2 bits per tet
    fbits = _Bitset.build(_pack_lanes(slots, 2))  # bit 2 t + s
    total_f = fbits.total
    k = jnp.arange(max_faces, dtype=jnp.int32)
    q = jnp.where(k < total_f, fbits.select(k), 0)
    ft, slot = q // 2, q % 2
    local = jnp.asarray(TRI_TABLE)[code[ft].astype(jnp.int32), slot]  # [F, 3] local edge ids
    cell, tt = ft // 6, ft % 6
    ci, cj, ck = cell // (n * n), (cell // n) % n, cell % n
    base = (ci * m + cj) * m + ck  # grid vertex of the cell's (0, 0, 0) corner
    lower = jnp.asarray(_EDGE_LOWER_ID)[tt[:, None], local]  # [F, 3] corner id 4x + 2y + z
    lower_v = ((lower >> 2) & 1) * (m * m) + ((lower >> 1) & 1) * m + (lower & 1)
    dense = (base[:, None] + lower_v) * 8 + jnp.asarray(_EDGE_OFF_ID)[tt[:, None], local]
    vidx = ebits.rank(dense)
    fmask = (k < total_f) & jnp.all(vidx < max_verts, axis=1)
    faces = jnp.where(fmask[:, None], vidx, 0).astype(jnp.int32)
    num_faces = jnp.sum(fmask.astype(jnp.int32))
    num_verts = jnp.minimum(total_v, max_verts).astype(jnp.int32)
    return TriMesh(pos, faces, fmask, vmask, num_faces, num_verts, (total_f - num_faces).astype(jnp.int32))


def _is_concrete(*xs) -> bool:
    return not any(isinstance(x, jax.core.Tracer) for x in xs)


def warn_if_degenerate(mesh: TriMesh, where: str = "marching_tets") -> None:
    """Warn (outside jit only) when ``mesh`` is empty or overflowed its buffers."""
    if not _is_concrete(mesh.num_faces, mesh.overflow):
        return
    nf, ov = int(mesh.num_faces), int(mesh.overflow)
    if nf == 0 and ov == 0:
        warnings.warn(f"{where}: the SDF has no zero crossing on the grid (all one sign): the mesh is empty",
                      RuntimeWarning, stacklevel=3)
    elif ov > 0:
        warnings.warn(f"{where}: {ov} faces did not fit in max_faces={mesh.faces.shape[0]} / "
                      f"max_verts={mesh.verts.shape[0]}; increase the capacity", RuntimeWarning, stacklevel=3)


def marching_tets(verts: Float[Array, "nv 3"], sdf: Float[Array, " nv"], grid: TetGrid | Int[Array, "nt 4"], *,
                  max_faces: int, max_verts: int | None = None) -> TriMesh:
    """Extract the ``sdf = 0`` surface of a tet grid into fixed-size buffers (see module docstring).

    Args:
      verts: [Nv, 3] float32 (deformed) grid vertex positions; gradients flow to them.
      sdf: [Nv] float32 signed distance (negative inside); gradients flow to it.
      grid: a :class:`~tsjax.geometry.tets.TetGrid` or a concrete [Nt, 4] int32 tet array (edges are
        then computed in numpy, each call). A grid built by :func:`~tsjax.geometry.tets.build_tet_grid`
        (``resolution > 0``) takes the structured Kuhn-grid path (strided slices instead of table
        gathers, identical output); any other grid uses its precomputed unique-edge tables.
      max_faces: face capacity (static).
      max_verts: vertex capacity (static); default ``max_faces`` (a closed surface has ~F/2 vertices).

    Returns:
      :class:`TriMesh`. Outside ``jit`` an empty surface or an overflow raises a ``RuntimeWarning``.
    """
    if max_faces < 1 or (max_verts is not None and max_verts < 1):
        raise ValueError(f"marching_tets: max_faces/max_verts must be >= 1, got {max_faces}/{max_verts}")
    max_verts = int(max_faces if max_verts is None else max_verts)
    kuhn = 0
    if isinstance(grid, TetGrid):
        tets, edges, tet_edges = grid.tets, grid.edges, grid.tet_edges
        if int(grid.resolution) > 0 and tuple(tets.shape) == (6 * int(grid.resolution) ** 3, 4):
            kuhn = int(grid.resolution)
    else:
        if isinstance(grid, jax.core.Tracer):
            raise ValueError("marching_tets: pass a TetGrid (precomputed edges) when tets are traced")
        tets = np.asarray(grid)
        edges, tet_edges = tet_edge_table(tets)
    verts = jnp.asarray(verts, jnp.float32)
    sdf = jnp.asarray(sdf, jnp.float32)
    if verts.ndim != 2 or verts.shape[1] != 3 or sdf.shape != (verts.shape[0],):
        raise ValueError(f"marching_tets: verts must be [Nv,3] and sdf [Nv], got {tuple(verts.shape)} and "
                         f"{tuple(sdf.shape)}")
    if kuhn:
        mesh = _marching_kuhn(verts, sdf, n=kuhn, max_faces=int(max_faces), max_verts=max_verts)
    else:
        mesh = _marching(verts, sdf, tets, edges, tet_edges, max_faces=int(max_faces), max_verts=max_verts)
    warn_if_degenerate(mesh)
    return mesh


def compact_mesh(mesh: TriMesh) -> tuple[np.ndarray, np.ndarray]:
    """Host-side ``(verts [V,3] float32, faces [F,3] int32)`` of the stored faces/vertices (numpy)."""
    nv, nf = int(mesh.num_verts), int(mesh.num_faces)
    return np.asarray(mesh.verts)[:nv].astype(np.float32), np.asarray(mesh.faces)[:nf].astype(np.int32)
