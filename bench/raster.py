"""Rasterizer benchmark: FFI kernel vs pure-JAX reference vs trimesh+embree ray casting.

Prints one JSON object per measurement (stdout). Usage:
  python bench/raster.py [--views 8] [--res 512] [--repeats 5] [--sizes 100k,1m] [--threads 1,auto]
                         [--only all|render]   (render: only the render / render_aa rows)

Meshes are icospheres (subdivision 6 = 81,920 triangles, 8 = 1,310,720 triangles) seen from orbit
cameras. Times are seconds; ``compile_s`` is the first call (trace + compile + run), ``median_s`` /
``min_s`` the median / minimum of ``repeats`` steady-state calls. Ray casting uses the same pixel
centres (one ray per pixel). On a shared machine compare the ratios, which are measured interleaved
(FFI and embree alternate call by call, as do render forward and forward+backward) and taken from
the minimum times (``*_min``) and from the medians. ``render`` = rasterize + interpolate vertex
colours + mean-squared loss; ``render_aa`` adds ``tsjax.ops.antialias`` before the loss.

Threads: embree ray casting (trimesh -> embreex ``rtcIntersect1`` per ray) runs on ONE thread (its BVH
build, timed separately, may use more). The FFI kernel is timed for every ``--threads`` setting
(``TSJAX_RASTER_THREADS``; ``auto`` = all hardware threads), all interleaved with embree call by call,
so ``ffi_ids`` with ``threads: 1`` and ``output: ids`` (the ids-only kernel that ``rasterize`` calls;
embree also returns only triangle ids) is the like-for-like comparison; ``output: ids+bary`` is the
kernel that also writes its own (u, v, z/w) (used by the parity tests), at one thread. ``cpu_*``
fields are process CPU seconds of the call (all threads), less sensitive to other jobs on a shared
machine than wall time.
The ``machine`` record states the load average before the run; ``load_after`` records it after.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import trimesh

from tsjax.ops import _ffi, antialias, interpolate, rasterize
from tsjax.ops.rasterize import _raster_ids_ref, _ref_chunk
from tsjax.render import camera as C

SIZES = {"100k": 6, "1m": 8}


def emit(**kw):
    print(json.dumps(kw), flush=True)


def _set_threads(t):
    """TSJAX_RASTER_THREADS for the next kernel calls (read by the FFI handler at each call)."""
    if t == "auto":
        os.environ.pop("TSJAX_RASTER_THREADS", None)
    else:
        os.environ["TSJAX_RASTER_THREADS"] = t


def _clock(fn):
    """(wall s, process CPU s, result) of one blocking call."""
    c0, t0 = time.process_time(), time.perf_counter()
    out = jax.block_until_ready(fn())
    return time.perf_counter() - t0, time.process_time() - c0, out


def timed(fn, repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    first = time.perf_counter() - t0
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        ts.append(time.perf_counter() - t0)
    timed.last_min = min(ts) if ts else first
    return first, (statistics.median(ts) if ts else first)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--views", type=int, default=8)
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--sizes", default="100k,1m")
    ap.add_argument("--threads", default="1,auto",
                    help="comma-separated FFI kernel thread counts to time (TSJAX_RASTER_THREADS; auto = all)")
    ap.add_argument("--only", choices=("all", "render"), default="all",
                    help="'render': time only the render / render_aa forward vs forward+backward rows")
    ap.add_argument("--ref-budget", type=float, default=60.0,
                    help="skip the pure-JAX reference when its estimated time exceeds this (s)")
    a = ap.parse_args()
    thread_opts = [t.strip() for t in a.threads.split(",") if t.strip()]
    for t in thread_opts:
        if t != "auto" and not (t.isdigit() and int(t) > 0):
            ap.error(f"--threads: {t!r} is not a positive integer or 'auto'")
    user_threads = os.environ.get("TSJAX_RASTER_THREADS")
    emit(kind="machine", cpu_count=os.cpu_count(), platform=platform.platform(), processor=platform.processor(),
         jax=jax.__version__, backend=jax.default_backend(), ffi_available=_ffi.available(),
         ffi_threads=thread_opts, auto_threads=os.cpu_count(), embree_threads=1,
         render_threads=user_threads or "auto", load_avg_1_5_15=list(os.getloadavg()))
    b, res = a.views, (a.res, a.res)
    az = jnp.linspace(0.0, 315.0, b)
    cams = C.make_cameras(jnp.where(jnp.arange(b) % 2 == 0, 0.0, 20.0), az, 1.6, fovy=50.0)
    for size in a.sizes.split(","):
        m = trimesh.creation.icosphere(SIZES[size], radius=0.45)
        verts = jnp.asarray(m.vertices, jnp.float32)
        tris = jnp.asarray(m.faces, jnp.int32)
        nf = int(tris.shape[0])
        common = dict(mesh=f"icosphere{SIZES[size]}", faces=nf, views=b, res=list(res))
        pc = jax.block_until_ready(C.world_to_clip(verts, cams))
        if a.only == "all":
            _raster_rows(a, m, pc, tris, nf, b, res, cams, common, thread_opts, user_threads)
        _render_rows(a, m, verts, tris, res, cams, common)
    emit(kind="load_after", load_avg_1_5_15=list(os.getloadavg()))


def _raster_rows(a, m, pc, tris, nf, b, res, cams, common, thread_opts, user_threads):
    """Rasterizer rows: FFI kernel variants, pure-JAX reference (or its estimate), embree ray casting."""

    # "ids": the ids-only kernel (what rasterize() calls; embree also returns only ids),
    # "ids+bary": the kernel that also writes its own (u, v, z/w) (parity tests), at 1 thread
    ffi_fns = {"ids": jax.jit(lambda p: _ffi.rasterize_ids_only(p, tris, *res)),
               "ids+bary": jax.jit(lambda p: _ffi.rasterize_ids(p, tris, *res))}
    ffi_compile = {}
    for out_kind, fn in ffi_fns.items():
        t0 = time.perf_counter()
        jax.block_until_ready(fn(pc))
        ffi_compile[out_kind] = time.perf_counter() - t0
    variants = [("ids", t) for t in thread_opts] + [("ids+bary", "1")]

    # pure-JAX reference: estimate from one view at 64x64 (cost ~ H*W*F) before running it
    # (timed on the first <= 16384 triangles, scaled by the triangle count)
    nf_est = min(nf, 16384)
    est_fn = jax.jit(lambda p: _raster_ids_ref(p, tris[:nf_est], 64, 64, _ref_chunk(64, 64, nf_est)))
    _, s_small = timed(lambda: est_fn(pc[:1]), 1)
    est = s_small * b * (res[0] * res[1]) / (64 * 64) * nf / nf_est
    if est > a.ref_budget:
        emit(kind="ref_ids", **common, skipped=True,
             reason=f"estimated {est:.0f}s for {b} views (> --ref-budget {a.ref_budget:.0f}s; O(H*W*F))",
             measured_1view_64x64_s=s_small, measured_faces=nf_est)
    else:
        ref_fn = jax.jit(lambda p: _raster_ids_ref(p, tris, res[0], res[1], _ref_chunk(res[0], res[1], nf)))
        c, s = timed(lambda: ref_fn(pc), 1)
        emit(kind="ref_ids", **common, compile_s=c, median_s=s, per_frame_s=s / b)

    # embree ray casting of the same pixel centres
    inv = np.linalg.inv(np.asarray(cams.proj))
    c2w = np.asarray(cams.c2w)
    xs = (2 * np.arange(res[1]) + 1) / res[1] - 1
    ys = 1 - (2 * np.arange(res[0]) + 1) / res[0]
    ndc = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    t0 = time.perf_counter()
    m.ray.intersects_first(np.zeros((1, 3)), np.array([[0.0, 0.0, 1.0]]))  # BVH build
    bvh = time.perf_counter() - t0
    rays = []
    for v in range(b):
        p = np.concatenate([ndc, -np.ones((len(ndc), 1)), np.ones((len(ndc), 1))], 1) @ inv[v].T
        d = (p[:, :3] / p[:, 3:]) @ c2w[v, :3, :3].T
        d /= np.linalg.norm(d, axis=1, keepdims=True)
        rays.append((np.broadcast_to(c2w[v, :3, 3], d.shape).copy(), d))
    t_ffi = {v: ([], []) for v in variants}  # (output, thread setting) -> (wall, cpu)
    t_emb, c_emb = [], []
    hits = ids = None
    for _ in range(a.repeats):  # interleaved: FFI (each variant) and embree see the same load
        for out_kind, t in variants:
            _set_threads(t)
            wall, cpu, out = _clock(lambda: ffi_fns[out_kind](pc))
            t_ffi[(out_kind, t)][0].append(wall)
            t_ffi[(out_kind, t)][1].append(cpu)
            if out_kind == "ids":
                ids = out
        c0, t0 = time.process_time(), time.perf_counter()
        hits = [m.ray.intersects_first(o, d) for o, d in rays]
        t_emb.append(time.perf_counter() - t0)
        c_emb.append(time.process_time() - c0)
    _set_threads(user_threads or "auto")
    ids = np.asarray(ids).reshape(b, -1).astype(np.int64) - 1
    hit = np.stack(hits)
    cov = (ids >= 0) | (hit >= 0)
    emb_med, emb_min = statistics.median(t_emb), min(t_emb)
    for (out_kind, t), (tw, tc) in t_ffi.items():
        med, mn = statistics.median(tw), min(tw)
        emit(kind="ffi_ids", **common, output=out_kind, threads=t, compile_s=ffi_compile[out_kind],
             median_s=med, min_s=mn,
             per_frame_s=med / b, per_frame_min_s=mn / b, cpu_median_s=statistics.median(tc), cpu_min_s=min(tc),
             speedup_vs_embree=emb_med / med, speedup_vs_embree_min=emb_min / mn,
             cpu_speedup_vs_embree_min=min(c_emb) / min(tc))
    emit(kind="embree_ray_cast", **common, threads=1, bvh_build_s=bvh, median_s=emb_med, min_s=emb_min,
         per_frame_s=emb_med / b, per_frame_min_s=emb_min / b, cpu_median_s=statistics.median(c_emb),
         cpu_min_s=min(c_emb), agreement_with_ffi=float((ids[cov] == hit[cov]).mean()),
         load_after=list(os.getloadavg()))


def _render_rows(a, m, verts, tris, res, cams, common):
    """Forward vs forward+backward of a render (rasterize + interpolate colours + loss), with and
    without antialiasing; forward and forward+backward calls alternate (same load)."""
    colors = jnp.asarray(np.asarray(m.vertices) * 0.5 + 0.5, jnp.float32)

    def loss(vv, backend="ffi"):
        rast = rasterize(C.world_to_clip(vv, cams), tris, res, backend=backend)
        col, _ = interpolate(colors, rast, tris)
        return jnp.mean((col - 0.5) ** 2)

    def loss_aa(vv):  # the same render with silhouette antialiasing (tsjax.ops.antialias)
        pcv = C.world_to_clip(vv, cams)
        rast = rasterize(pcv, tris, res, backend="ffi")
        col, _ = interpolate(colors, rast, tris)
        return jnp.mean((antialias(col, rast, pcv, tris) - 0.5) ** 2)

    for tag, fn in (("render", loss), ("render_aa", loss_aa)):
        fwd = jax.jit(fn)
        fb = jax.jit(jax.value_and_grad(fn))
        c1, _ = timed(lambda: fwd(verts), 0)
        c2, _ = timed(lambda: fb(verts), 0)
        t_f, t_fb = [], []
        for _ in range(a.repeats):  # interleaved
            t0 = time.perf_counter()
            jax.block_until_ready(fwd(verts))
            t_f.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            jax.block_until_ready(fb(verts))
            t_fb.append(time.perf_counter() - t0)
        emit(kind=f"{tag}_fwd", **common, compile_s=c1, median_s=statistics.median(t_f), min_s=min(t_f))
        emit(kind=f"{tag}_fwd_bwd", **common, compile_s=c2, median_s=statistics.median(t_fb), min_s=min(t_fb),
             ratio_to_fwd=statistics.median(t_fb) / statistics.median(t_f), ratio_to_fwd_min=min(t_fb) / min(t_f))


if __name__ == "__main__":
    main()
