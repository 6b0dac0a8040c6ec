"""Triangle rasterization with nvdiffrast-like output and gradients w.r.t. clip-space positions.

Conventions (docs/conventions.md):
  * Input ``pos_clip [B, V, 4]`` (or ``[V, 4]``, then B = 1) in OpenGL clip space; ``tris [F, 3]`` int32.
  * Output ``rast [B, H, W, 4]`` float32 = (u, v, z/w, triangle_id + 1); the last channel is 0 where no
    triangle covers the pixel. Barycentrics are perspective-correct and an attribute interpolates as
    ``u * a0 + v * a1 + (1 - u - v) * a2``.
  * Row 0 is the TOP of the image: pixel (i, j) samples NDC x = (2j + 1)/W - 1, y = 1 - (2i + 1)/H.
  * Coverage rule: a pixel centre is covered when all three screen-space barycentrics are >= 0
    (both windings are rasterized, no culling) and it lies within 0.01 pixel of the triangle's
    bounding box. The arithmetic is defined operation by operation in float32 (:func:`_screen_bary`,
    :func:`_depth`) and evaluated identically here and in the C++/CUDA kernels, so triangle ids agree
    bit for bit, also on ties along shared edges. Depth test: smallest z/w wins; equal depths go to the
    smaller triangle id. Only z/w in [-1, 1] is kept (near/far clipping per pixel). Triangles with any
    vertex at w <= 1e-8 (behind the camera) or with a screen-space |2 area| <= 1e-12 (or non-finite)
    are never drawn (no geometric near-plane clipping: keep geometry in front of the near plane).

Gradients: triangle ids are piecewise constant and carry no gradient (``stop_gradient``). The (u, v,
z/w) channels are recomputed differentiably in JAX from the ids and ``pos_clip``
(:func:`barycentrics_from_ids`), so gradients reach vertex positions through the interior of
triangles; silhouette (visibility) gradients come from :func:`tsjax.ops.antialias`. The backward
pass of the recomputation is written out analytically (:func:`_persp_bary`) and its per-pixel
corner cotangents are summed into ``[B, V, 4]`` by a deterministic row scatter-add
(:mod:`tsjax.ops._rows`, native on the CPU).

Backends:
  * ``"ref"``        pure JAX, chunked over triangles (memory ~ H*W*chunk), exact but O(H*W*F).
  * ``"ffi"``        the C++ (CPU) / CUDA kernel from ``csrc/`` as an XLA FFI custom call.
  * ``"auto"``       ``"ffi"`` when the compiled library is available for the platform, else ``"ref"``.
  * ``"nvdiffrast"`` optional, through DLPack and torch; only when nvdiffrast and CUDA are importable.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from tsjax.ops._rows import gather_rows

__all__ = ["rasterize", "barycentrics_from_ids", "pixel_centers", "MAX_RESOLUTION"]

MAX_RESOLUTION = 16384
_W_EPS = 1e-8
_AREA_EPS = 1e-12
_BOX_PAD = 1e-2  # pixels; csrc/kernels/rasterize_cpu.cc kPad


def pixel_centers(h: int, w: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """NDC coordinates of pixel centres: x [H, W] (left to right), y [H, W] (top = +1), float32.

    Computed on the host in float32 as ``(2j + 1) / W - 1`` and ``1 - (2i + 1) / H`` (one rounding per
    operation, the same values as the C++/CUDA kernels) and embedded as constants, so the compiler
    cannot re-associate or rewrite the division.
    """
    xs = (2.0 * np.arange(w, dtype=np.float32) + np.float32(1.0)) / np.float32(w) - np.float32(1.0)
    ys = np.float32(1.0) - (2.0 * np.arange(h, dtype=np.float32) + np.float32(1.0)) / np.float32(h)
    xs, ys = xs.astype(np.float32), ys.astype(np.float32)
    return jnp.broadcast_to(jnp.asarray(xs)[None, :], (h, w)), jnp.broadcast_to(jnp.asarray(ys)[:, None], (h, w))


@jax.custom_jvp
def _rounded(p):
    """Identity on a float product that pins its rounding: ``where(p == 0, 0, p)``.

    XLA's CPU backend lets LLVM contract ``a * b - c`` into a fused multiply-add, which rounds once
    instead of twice and so flips coverage/depth decisions on ties (shared edges) relative to the C++
    kernel (built with ``-ffp-contract=off``) and across XLA versions. A select between the multiply
    and its user blocks the contraction; it changes nothing but the sign of an exact zero, which no
    comparison here sees. Its derivative is the identity (custom JVP), also at ``p == 0``.
    """
    return jnp.where(p == 0, jnp.zeros_like(p), p)


@_rounded.defjvp
def _rounded_jvp(primals, tangents):
    return _rounded(primals[0]), tangents[0]


def _cross(ax, ay, bx, by):
    """``ax * by - ay * bx`` with both products rounded to float before the subtraction."""
    return _rounded(ax * by) - _rounded(ay * bx)


def _ndc(tri4, wv):
    """NDC x, y, z (each [...,]) of clip corners ``tri4 [..., 4]`` divided by ``wv [...]``.

    One true division per coordinate with a same-shaped divisor (XLA rewrites a division by a
    broadcast into a multiplication by the reciprocal, which rounds differently from the kernels).
    """
    return tri4[..., 0] / wv, tri4[..., 1] / wv, tri4[..., 2] / wv


def _screen_bary(p0, p1, p2, px, py):
    """Screen-space barycentrics of points (px, py) w.r.t. 2D triangles p0, p1, p2 (broadcasting).

    Exact arithmetic definition shared with the C++/CUDA kernels (every operation rounds to float32
    once, evaluated in this order):
      area = (x1 - x0)(y2 - y0) - (y1 - y0)(x2 - x0)            (twice the signed area)
      e0 = (x1 - px)(y2 - py) - (y1 - py)(x2 - px),  e1 = (x2 - px)(y0 - py) - (y2 - py)(x0 - px)
      inv = 1 / area (1 / 1 where |area| <= 1e-12),  b0 = e0 * inv,  b1 = e1 * inv,  b2 = (1 - b0) - b1
    Returns (b0, b1, b2, area).
    """
    area = _cross(p1[..., 0] - p0[..., 0], p1[..., 1] - p0[..., 1], p2[..., 0] - p0[..., 0], p2[..., 1] - p0[..., 1])
    inv = 1.0 / jnp.where(jnp.abs(area) > _AREA_EPS, area, 1.0)
    e0 = _cross(p1[..., 0] - px, p1[..., 1] - py, p2[..., 0] - px, p2[..., 1] - py)
    e1 = _cross(p2[..., 0] - px, p2[..., 1] - py, p0[..., 0] - px, p0[..., 1] - py)
    b0 = _rounded(e0 * inv)
    b1 = _rounded(e1 * inv)
    return b0, b1, 1.0 - b0 - b1, area


def _depth(b0, b1, b2, z0, z1, z2):
    """Screen-affine depth ``(b0 z0 + b1 z1) + b2 z2`` with rounded products (kernels' order)."""
    return _rounded(b0 * z0) + _rounded(b1 * z1) + _rounded(b2 * z2)


def _pixel_range(x, y, h, w):
    """Continuous pixel-index coordinates of NDC points: ``sx = ((x + 1) W - 1) / 2`` (column),
    ``sy = ((1 - y) H - 1) / 2`` (row); pixel (i, j) has its centre at (sy, sx) = (i, j)."""
    sx = _rounded((_rounded((x + 1.0) * float(w)) - 1.0) * 0.5)
    sy = _rounded((_rounded((1.0 - y) * float(h)) - 1.0) * 0.5)
    return sx, sy


def _validate(pos_clip, tris, resolution):
    if not isinstance(resolution, (tuple, list)) or len(resolution) != 2:
        raise ValueError(f"rasterize: resolution must be (H, W), got {resolution!r}")
    h, w = (int(r) for r in resolution)
    if not (0 < h <= MAX_RESOLUTION and 0 < w <= MAX_RESOLUTION):
        raise ValueError(f"rasterize: resolution {h}x{w} out of range (1..{MAX_RESOLUTION} per side)")
    if pos_clip.ndim not in (2, 3) or pos_clip.shape[-1] != 4:
        raise ValueError(f"rasterize: pos_clip must be [V,4] or [B,V,4], got shape {tuple(pos_clip.shape)}")
    if tris.ndim != 2 or tris.shape[-1] != 3:
        raise ValueError(f"rasterize: tris must be [F,3], got shape {tuple(tris.shape)}")
    if not jnp.issubdtype(tris.dtype, jnp.integer):
        raise ValueError(f"rasterize: tris must be an integer array, got {tris.dtype}")
    nv = pos_clip.shape[-2]
    if not isinstance(tris, jax.core.Tracer) and tris.size:
        t = np.asarray(tris)
        if t.min() < 0 or t.max() >= nv:
            raise ValueError(f"rasterize: triangle indices out of range [0, {nv}) (min {t.min()}, max {t.max()})")
    if not isinstance(pos_clip, jax.core.Tracer):
        if not np.all(np.isfinite(np.asarray(pos_clip))):
            raise ValueError("rasterize: pos_clip contains NaN or inf")
    return h, w


def _triangle_setup(pc, tris, h, w):
    """Per-triangle NDC corners [F,3,3], validity [F] and padded pixel box [F,4] for one view.

    A triangle is valid when all corners have w > 1e-8 and its doubled area is finite with
    |area| > 1e-12. The box (j_lo, j_hi, i_lo, i_hi) bounds the pixel-index coordinates of the
    corners, widened by ``_BOX_PAD`` pixel: a pixel centre outside it is never covered (this also
    keeps float noise in the edge functions of slivers from covering far-away pixels).
    """
    tri = pc[tris]  # [F, 3, 4]
    wv = tri[..., 3]
    ok_w = jnp.all(wv > _W_EPS, axis=-1)
    x, y, z = _ndc(tri, jnp.where(ok_w[:, None], wv, 1.0))
    ndc = jnp.stack([x, y, z], axis=-1)
    _, _, _, area = _screen_bary(ndc[:, 0, :2], ndc[:, 1, :2], ndc[:, 2, :2], 0.0, 0.0)
    valid = ok_w & (jnp.abs(area) > _AREA_EPS) & jnp.isfinite(area)
    sx, sy = _pixel_range(x, y, h, w)
    box = jnp.stack([sx.min(-1) - _BOX_PAD, sx.max(-1) + _BOX_PAD, sy.min(-1) - _BOX_PAD, sy.max(-1) + _BOX_PAD], -1)
    return ndc, valid, box


@functools.partial(jax.jit, static_argnames=("h", "w", "chunk"))
def _raster_ids_ref(pos_clip, tris, h, w, chunk):
    """Pure-JAX visibility: triangle id + 1 per pixel, [B, H, W] int32 (0 = empty)."""
    px, py = pixel_centers(h, w)
    px, py = px.reshape(-1, 1), py.reshape(-1, 1)
    jj = jnp.broadcast_to(jnp.arange(w, dtype=jnp.float32)[None, :], (h, w)).reshape(-1, 1)
    ii = jnp.broadcast_to(jnp.arange(h, dtype=jnp.float32)[:, None], (h, w)).reshape(-1, 1)
    nf = tris.shape[0]
    nchunks = -(-nf // chunk)
    pad = nchunks * chunk - nf

    def one_view(pc):
        ndc, valid, box = _triangle_setup(pc, tris, h, w)
        ndc = jnp.pad(ndc, ((0, pad), (0, 0), (0, 0)))
        valid = jnp.pad(valid, (0, pad))
        box = jnp.pad(box, ((0, pad), (0, 0)))
        ndc = ndc.reshape(nchunks, chunk, 3, 3)
        valid = valid.reshape(nchunks, chunk)
        box = box.reshape(nchunks, chunk, 4)
        base = (jnp.arange(nchunks, dtype=jnp.int32) * chunk)

        def body(carry, xs):
            best_z, best_id = carry
            nd, ok, bx, b = xs
            b0, b1, b2, _ = _screen_bary(nd[None, :, 0, :2], nd[None, :, 1, :2], nd[None, :, 2, :2], px, py)
            z = _depth(b0, b1, b2, nd[None, :, 0, 2], nd[None, :, 1, 2], nd[None, :, 2, 2])
            in_box = (jj >= bx[None, :, 0]) & (jj <= bx[None, :, 1]) & (ii >= bx[None, :, 2]) & (ii <= bx[None, :, 3])
            inside = (b0 >= 0) & (b1 >= 0) & (b2 >= 0) & ok[None, :] & in_box & (z >= -1.0) & (z <= 1.0)
            z = jnp.where(inside, z, jnp.inf)
            arg = jnp.argmin(z, axis=1)
            zmin = jnp.take_along_axis(z, arg[:, None], axis=1)[:, 0]
            better = zmin < best_z
            best_z = jnp.where(better, zmin, best_z)
            best_id = jnp.where(better, b + arg.astype(jnp.int32) + 1, best_id)
            return (best_z, best_id), None

        init = (jnp.full((h * w,), jnp.inf, jnp.float32), jnp.zeros((h * w,), jnp.int32))
        (_, ids), _ = jax.lax.scan(body, init, (ndc, valid, box, base))
        return ids.reshape(h, w)

    return jax.vmap(one_view)(pos_clip)


def _persp_terms(tri, px, py, covered):
    """Forward of :func:`_persp_bary` plus the intermediates its backward needs."""
    wv = jnp.where(covered[..., None], tri[..., 3], 1.0)
    x, y, z = _ndc(tri, wv)  # [..., 3] each
    b0, b1, b2, area = _screen_bary(jnp.stack([x[..., 0], y[..., 0]], -1), jnp.stack([x[..., 1], y[..., 1]], -1),
                                    jnp.stack([x[..., 2], y[..., 2]], -1), px, py)
    q0, q1, q2 = b0 / wv[..., 0], b1 / wv[..., 1], b2 / wv[..., 2]
    den = q0 + q1 + q2
    den_ok = covered & (jnp.abs(den) > 1e-20)
    den = jnp.where(den_ok, den, 1.0)
    u, v = q0 / den, q1 / den
    zw = _depth(b0, b1, b2, z[..., 0], z[..., 1], z[..., 2])
    return (u, v, zw), (wv, x, y, z, b0, b1, b2, area, den, den_ok)


@jax.custom_vjp
def _persp_bary(tri, px, py, covered):
    """Perspective-correct (u, v, z/w) [...] at pixel centres (px, py) of clip triangles tri [..., 3, 4].

    The backward pass is written out analytically (one fused elementwise pass producing the [..., 3, 4]
    cotangent) instead of differentiating the forward through many slices, which XLA materialises.
    """
    return _persp_terms(tri, px, py, covered)[0]


def _persp_bary_fwd(tri, px, py, covered):
    return _persp_bary(tri, px, py, covered), (tri, px, py, covered)


def _persp_bary_bwd(res, g):
    tri, px, py, covered = res
    gu, gv, gz = (jnp.where(covered, t, 0.0) for t in g)
    (u, v, _), (wv, x, y, z, b0, b1, b2, area, den, den_ok) = _persp_terms(tri, px, py, covered)
    w0, w1, w2 = wv[..., 0], wv[..., 1], wv[..., 2]
    # u = q0 / den, v = q1 / den, den = q0 + q1 + q2 (den held at 1 where it was replaced)
    s_ = jnp.where(den_ok, (gu * u + gv * v) / den, 0.0)
    gq0, gq1, gq2 = gu / den - s_, gv / den - s_, -s_
    # q_k = b_k / w_k ; zw = b0 z0 + b1 z1 + b2 z2 ; b2 = 1 - b0 - b1
    gb0 = gq0 / w0 + gz * z[..., 0]
    gb1 = gq1 / w1 + gz * z[..., 1]
    gb2 = gq2 / w2 + gz * z[..., 2]
    gb0, gb1 = gb0 - gb2, gb1 - gb2
    gw = [-gq0 * b0 / (w0 * w0), -gq1 * b1 / (w1 * w1), -gq2 * b2 / (w2 * w2)]
    gzk = [gz * b0, gz * b1, gz * b2]
    # b0 = e0 / A, b1 = e1 / A (A held constant where |A| <= eps)
    a_ok = jnp.abs(area) > _AREA_EPS
    inv = 1.0 / jnp.where(a_ok, area, 1.0)
    ge0, ge1 = gb0 * inv, gb1 * inv
    ga = jnp.where(a_ok, -(gb0 * b0 + gb1 * b1) * inv, 0.0)
    x0, x1, x2 = x[..., 0], x[..., 1], x[..., 2]
    y0, y1, y2 = y[..., 0], y[..., 1], y[..., 2]
    # e0 = (x1-px)(y2-py) - (y1-py)(x2-px); e1 = (x2-px)(y0-py) - (y2-py)(x0-px);
    # A = (x1-x0)(y2-y0) - (y1-y0)(x2-x0)
    gx = [ge1 * -(y2 - py) + ga * (y1 - y2),
          ge0 * (y2 - py) + ga * (y2 - y0),
          ge0 * -(y1 - py) + ge1 * (y0 - py) + ga * (y0 - y1)]
    gy = [ge1 * (x2 - px) + ga * (x2 - x1),
          ge0 * -(x2 - px) + ga * (x0 - x2),
          ge0 * (x1 - px) + ge1 * -(x0 - px) + ga * (x1 - x0)]
    # x_k = cx_k / w_k (same for y, z): d/dcx = 1 / w, d/dw = -x / w
    out = []
    for k in range(3):
        wk = wv[..., k]
        gwk = gw[k] - (gx[k] * x[..., k] + gy[k] * y[..., k] + gzk[k] * z[..., k]) / wk
        out.append(jnp.stack([gx[k] / wk, gy[k] / wk, gzk[k] / wk, gwk], -1))
    gtri = jnp.where(covered[..., None, None], jnp.stack(out, -2), 0.0).astype(tri.dtype)
    return gtri, None, None, None


_persp_bary.defvjp(_persp_bary_fwd, _persp_bary_bwd)


def barycentrics_from_ids(pos_clip: Float[Array, "b v 4"], tris: Int[Array, "f 3"],
                          tri_ids: Int[Array, "b h w"]) -> Float[Array, "b h w 4"]:
    """Differentiable (u, v, z/w, id+1) from per-pixel triangle ids (id+1, 0 = empty).

    Perspective-correct barycentrics at pixel centres: with screen-space barycentrics b_i and clip
    w_i, u_i = (b_i / w_i) / sum_j (b_j / w_j). z/w is affine in screen space: sum_i b_i z_i / w_i.
    Empty pixels are all zeros. Gradients flow to ``pos_clip`` (analytic backward, then a
    deterministic row scatter-add into [B, V, 4]); ids are treated as constants.
    """
    tri_ids = jax.lax.stop_gradient(tri_ids)
    b, h, w = tri_ids.shape
    px, py = pixel_centers(h, w)
    covered = tri_ids > 0
    fid = jnp.where(covered, tri_ids - 1, 0).reshape(b, h * w)
    vidx = gather_rows(tris[None], fid)  # [B, H*W, 3]
    tri = gather_rows(pos_clip, vidx.reshape(b, h * w * 3)).reshape(b, h, w, 3, 4)
    u, v, zw = _persp_bary(tri, px[None].astype(tri.dtype), py[None].astype(tri.dtype), covered)
    out = jnp.stack([u, v, zw, tri_ids.astype(u.dtype)], axis=-1)
    return jnp.where(covered[..., None], out, 0.0)


def _ref_chunk(h: int, w: int, nf: int) -> int:
    return int(max(1, min(nf, (1 << 22) // max(1, h * w))))


def rasterize(pos_clip: Float[Array, "b v 4"] | Float[Array, "v 4"], tris: Int[Array, "f 3"],
              resolution: tuple[int, int], *, backend: str = "auto") -> Float[Array, "b h w 4"]:
    """Rasterize triangles; see the module docstring for conventions, gradients and backends.

    Args:
      pos_clip: [B, V, 4] or [V, 4] clip-space vertex positions (float32).
      tris: [F, 3] int32 vertex indices.
      resolution: (H, W) static output size.
      backend: "auto" | "ffi" | "ref" | "nvdiffrast".

    Returns:
      rast [B, H, W, 4] float32 (u, v, z/w, triangle_id + 1).
    """
    pos_clip = jnp.asarray(pos_clip, jnp.float32)
    tris = jnp.asarray(tris)
    h, w = _validate(pos_clip, tris, resolution)
    tris = tris.astype(jnp.int32)
    if pos_clip.ndim == 2:
        pos_clip = pos_clip[None]
    if tris.shape[0] == 0:
        return jnp.zeros((pos_clip.shape[0], h, w, 4), jnp.float32)
    if backend == "auto":
        from tsjax.ops import _ffi

        backend = "ffi" if _ffi.available() else "ref"
    if backend == "ref":
        ids = _raster_ids_ref(jax.lax.stop_gradient(pos_clip), tris, h, w, _ref_chunk(h, w, tris.shape[0]))
    elif backend == "ffi":
        from tsjax.ops import _ffi

        ids = _ffi.rasterize_ids_only(jax.lax.stop_gradient(pos_clip), tris, h, w)
    elif backend == "nvdiffrast":
        from tsjax.ops import _nvdiffrast

        ids = _nvdiffrast.rasterize_ids(jax.lax.stop_gradient(pos_clip), tris, h, w)
    else:
        raise ValueError(f"rasterize: unknown backend {backend!r} (expected auto, ffi, ref or nvdiffrast)")
    return barycentrics_from_ids(pos_clip, tris, ids)
