"""Regularisers for DMTet optimisation (pure functions with static shapes; masks handle unused slots).

* :func:`sdf_sign_change`  DMTet's BCE between the SDF signs of the two ends of every grid edge whose
  sign changes (pushes the surface to be "crisp": fewer spurious crossings / floaters).
* :func:`normal_consistency`  1 - cos between normals of faces sharing an edge of the extracted mesh.
* :func:`laplacian_smoothness`  squared uniform-Laplacian length of the extracted vertices.
* :func:`mask_sparsity`, :func:`opacity_entropy`  opacity terms on rendered masks.
* :func:`total_variation`  on rendered images.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from tsjax.geometry.marching import TriMesh

__all__ = ["sdf_sign_change", "normal_consistency", "laplacian_smoothness", "mask_sparsity",
           "opacity_entropy", "total_variation"]


def sdf_sign_change(sdf: Float[Array, " nv"], edges: Int[Array, "ne 2"]) -> Float[Array, ""]:
    """Mean over sign-changing edges (a, b) of ``BCE(sigmoid(s_a), s_b > 0) + BCE(sigmoid(s_b), s_a > 0)``.

    0 when no edge changes sign. ``edges`` are the grid's unique edges ``TetGrid.edges``.
    """
    sa, sb = sdf[edges[:, 0]], sdf[edges[:, 1]]
    ya, yb = (sa > 0).astype(jnp.float32), (sb > 0).astype(jnp.float32)
    cross = (ya != yb).astype(jnp.float32)

    def bce(logit, target):  # stable binary cross-entropy with logits
        return jnp.maximum(logit, 0) - logit * target + jnp.log1p(jnp.exp(-jnp.abs(logit)))

    loss = (bce(sa, yb) + bce(sb, ya)) * cross
    return jnp.sum(loss) / jnp.maximum(jnp.sum(cross), 1.0)


def _edge_pairs(faces: Int[Array, "f 3"], face_mask):
    """Pairs of faces sharing an edge: (face_a [3F], face_b [3F], valid [3F]) from a sort of the edge keys."""
    f = faces.shape[0]
    a = faces
    b = jnp.roll(faces, -1, axis=1)
    lo = jnp.minimum(a, b).reshape(-1)
    hi = jnp.maximum(a, b).reshape(-1)
    fid = jnp.repeat(jnp.arange(f, dtype=jnp.int32), 3)
    valid = jnp.repeat(face_mask, 3)
    big = jnp.iinfo(jnp.int32).max
    lo = jnp.where(valid, lo, big)  # masked edges sort last and never match a valid one
    hi = jnp.where(valid, hi, big)
    lo_s, hi_s, fid_s = jax.lax.sort((lo, hi, fid), num_keys=2)
    same = (lo_s[:-1] == lo_s[1:]) & (hi_s[:-1] == hi_s[1:]) & (lo_s[:-1] != big)
    return fid_s[:-1], fid_s[1:], same


def normal_consistency(mesh: TriMesh) -> Float[Array, ""]:
    """Mean ``1 - cos(n_i, n_j)`` over pairs of stored faces sharing an edge (0 for a flat mesh)."""
    p = mesh.verts[mesh.faces]
    n = jnp.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
    n = n * jax.lax.rsqrt(jnp.maximum(jnp.sum(n * n, -1, keepdims=True), 1e-20))
    fa, fb, same = _edge_pairs(mesh.faces, mesh.face_mask)
    cos = jnp.sum(n[fa] * n[fb], -1)
    w = same.astype(jnp.float32)
    return jnp.sum((1.0 - cos) * w) / jnp.maximum(jnp.sum(w), 1.0)


def laplacian_smoothness(mesh: TriMesh) -> Float[Array, ""]:
    """Mean over stored vertices of ``|mean(neighbours) - v|^2`` (uniform weights, neighbours from faces)."""
    v = mesh.verts
    nv = v.shape[0]
    fm = mesh.face_mask.astype(jnp.float32)
    src = mesh.faces.reshape(-1)
    dst = jnp.roll(mesh.faces, -1, axis=1).reshape(-1)
    w = jnp.repeat(fm, 3)
    # both directions of every face edge (interior edges are seen twice from each side: equal weights)
    idx = jnp.concatenate([src, dst])
    nbr = jnp.concatenate([dst, src])
    ww = jnp.concatenate([w, w])
    acc = jax.ops.segment_sum(v[nbr] * ww[:, None], idx, num_segments=nv)
    cnt = jax.ops.segment_sum(ww, idx, num_segments=nv)
    lap = acc / jnp.maximum(cnt, 1.0)[:, None] - v
    used = (cnt > 0).astype(jnp.float32)
    return jnp.sum(jnp.sum(lap * lap, -1) * used) / jnp.maximum(jnp.sum(used), 1.0)


def mask_sparsity(mask: Float[Array, "... 1"]) -> Float[Array, ""]:
    """Mean rendered opacity (penalises covering more of the image than needed)."""
    return jnp.mean(mask)


def opacity_entropy(mask: Float[Array, "... 1"], eps: float = 1e-5) -> Float[Array, ""]:
    """Mean binary entropy of the opacity (pushes antialiased masks towards 0/1)."""
    m = jnp.clip(mask, eps, 1.0 - eps)
    return -jnp.mean(m * jnp.log(m) + (1.0 - m) * jnp.log(1.0 - m))


def total_variation(img: Float[Array, "b h w c"]) -> Float[Array, ""]:
    """Anisotropic L1 total variation: mean |dI/dx| + mean |dI/dy| over an [B, H, W, C] image."""
    dx = jnp.abs(img[:, :, 1:] - img[:, :, :-1])
    dy = jnp.abs(img[:, 1:] - img[:, :-1])
    return jnp.mean(dx) + jnp.mean(dy)
