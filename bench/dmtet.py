"""DMTet benchmark: static-shape marching tets in JAX (tsjax) vs a straightforward PyTorch version, CPU.

Prints one JSON object per line (stdout). Usage:
  python bench/dmtet.py [--grids 64,128,192] [--repeats 5] [--views 2] [--res 256]

Workloads, on the Kuhn grid of N cells per side (``tsjax.geometry.tets``) with a wavy-sphere SDF
(radius 0.3 + 0.02 sin-bumps; the same SDF and grid for both implementations):
  * ``extract``: marching tets only (surface vertices + faces).
  * ``extract_backward``: extraction + backward of the surface area (sum of triangle areas) to the SDF
    and the vertex positions.
  * ``extract_render_backward`` (tsjax only): extraction + ``render_trimesh`` (``--views`` cameras at
    ``--res`` px: colour from a position-dependent albedo, normal, mask, antialiased) + backward of
    mean(colour) + mean(mask) to the SDF and positions. There is no CPU differentiable rasterizer for
    PyTorch in this environment (nvdiffrast is CUDA only), so this row has no PyTorch counterpart.

PyTorch implementation (written for this bench, the standard approach of DMTet/threestudio-style
code): occupancy per vertex, per-tet 4-bit case code, the tets with 1..3 outside vertices selected with a
boolean mask, their 6 local edges sorted and de-duplicated with ``torch.unique`` (int64 keys
``a * Nv + b``), zero crossings interpolated on the unique crossing edges, and triangles gathered from
the same 16-case table as tsjax (:data:`tsjax.geometry.marching.TRI_TABLE`) for the 1- and 2-triangle
cases. Outputs are dynamic-size tensors (no capacity, no compile). Both give the same faces (checked).

tsjax: the jitted ``marching_tets`` with a static face capacity (1.25 x the surface's face count,
rounded up to 1024) -- every jitted call compiles once for any surface that fits.

Every (implementation, grid, workload) runs in its own subprocess. ``base_rss_bytes``: resident memory
after imports, grid loading and SDF set-up; the high-water mark is then reset (Linux
``/proc/self/clear_refs``) and ``peak_rss_bytes`` is the process's peak resident memory (``VmHWM``)
over the compile and all calls of the workload. ``peak - base`` approximates the workload's own memory
(it under-counts when the workload reuses memory freed after the base was taken; the absolute peak is
the reliable figure). ``compile_s``: tsjax ``lower + compile`` time (0 for PyTorch, eager). ``first_s``: first call,
``median_s`` / ``min_s``: over ``--repeats`` steady calls. The machine is shared: compare the ratios
(``torch_over_tsjax`` = PyTorch min time / tsjax min time, > 1 means tsjax is faster), which come from
the same run.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

WORKLOADS = ("extract", "extract_backward", "extract_render_backward")


def emit(**kw):
    print(json.dumps(kw), flush=True)


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _start_memory() -> int:
    """Reset the high-water mark (Linux ``clear_refs`` 5) and return the current resident bytes."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass
    return _status_bytes("VmRSS")


def _peak() -> int:
    return _status_bytes("VmHWM")


def wavy_sdf(verts: np.ndarray) -> np.ndarray:
    """The bench SDF [Nv] float32: a sphere of radius 0.3 with 0.02-amplitude bumps (negative inside)."""
    v = verts.astype(np.float64)
    bumps = 0.02 * np.sin(9 * v[:, 0]) * np.sin(11 * v[:, 1] + 1.0) * np.sin(7 * v[:, 2] + 2.0)
    return (np.linalg.norm(v, axis=1) - 0.3 + bumps).astype(np.float32)


def _stats(first, times):
    return dict(first_s=round(first, 5), median_s=round(statistics.median(times), 5), min_s=round(min(times), 5))


# ------------------------------------------------------------------------------------------ PyTorch
def torch_marching_tets(pos, sdf, tets, tri_table, num_tris):
    """Marching tets in PyTorch (dynamic shapes). pos [Nv,3] float, sdf [Nv] float, tets [Nt,4] int64,
    tri_table [16,2,3] int64 (local edge ids), num_tris [16] int64. Returns (verts [V,3], faces [F,3])."""
    import torch

    local_edges = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.long)
    occ = sdf > 0
    occ_t = occ[tets]  # [Nt, 4]
    n_out = occ_t.sum(1)
    valid = (n_out > 0) & (n_out < 4)
    vt = tets[valid]  # [Nv_t, 4]
    e = vt[:, local_edges].reshape(-1, 2)  # [6 Nv_t, 2]
    e, _ = torch.sort(e, dim=1)
    nv = pos.shape[0]
    key = e[:, 0] * nv + e[:, 1]
    ukey, inv = torch.unique(key, return_inverse=True)
    ua, ub = ukey // nv, ukey % nv
    crossing = occ[ua] != occ[ub]
    vid = torch.full((ukey.shape[0],), -1, dtype=torch.long)
    vid[crossing] = torch.arange(int(crossing.sum()), dtype=torch.long)
    ca, cb = ua[crossing], ub[crossing]
    sa, sb = sdf[ca], sdf[cb]
    t = (sa / (sa - sb)).unsqueeze(1)
    verts = pos[ca] + t * (pos[cb] - pos[ca])
    edge_vid = vid[inv].reshape(-1, 6)  # [Nv_t, 6]
    code = (occ_t[valid].long() * torch.tensor([1, 2, 4, 8], dtype=torch.long)).sum(1)
    ntri = num_tris[code]
    one, two = ntri == 1, ntri == 2
    f1 = torch.gather(edge_vid[one], 1, tri_table[code[one], 0])
    f2 = torch.gather(edge_vid[two], 1, tri_table[code[two]].reshape(-1, 6)).reshape(-1, 3)
    return verts, torch.cat([f1, f2], 0)


def _area_torch(v, f):
    import torch

    p = v[f]
    cr = torch.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0], dim=1)
    return 0.5 * torch.sqrt((cr * cr).sum(1) + 1e-20).sum()


def worker_torch(n, workload, repeats, threads=0):
    import torch

    if threads > 0:
        torch.set_num_threads(threads)

    from tsjax.geometry.marching import NUM_TRIS, TRI_TABLE
    from tsjax.geometry.tets import build_tet_grid

    g = build_tet_grid(n)
    pos0 = torch.from_numpy(g.verts)
    sdf0 = torch.from_numpy(wavy_sdf(g.verts))
    tets = torch.from_numpy(g.tets).long()
    del g
    table, ntab = torch.from_numpy(TRI_TABLE).long(), torch.from_numpy(NUM_TRIS).long()
    base = _start_memory()

    if workload == "extract":
        def run():
            with torch.no_grad():
                v, f = torch_marching_tets(pos0, sdf0, tets, table, ntab)
            return int(f.shape[0]), int(v.shape[0]), None
    elif workload == "extract_backward":
        def run():
            pos = pos0.clone().requires_grad_(True)
            sdf = sdf0.clone().requires_grad_(True)
            v, f = torch_marching_tets(pos, sdf, tets, table, ntab)
            area = _area_torch(v, f)
            area.backward()
            return int(f.shape[0]), int(v.shape[0]), float(area)
    else:
        raise ValueError(f"no PyTorch version of {workload}")
    t0 = time.perf_counter()
    nf, nvv, area = run()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return dict(impl="torch", torch_version=torch.__version__, torch_threads=torch.get_num_threads(),
                faces=nf, verts=nvv, area=area, compile_s=0.0, **_stats(first, times),
                base_rss_bytes=base, peak_rss_bytes=_peak())


# -------------------------------------------------------------------------------------------- tsjax
def worker_jax(n, workload, repeats, views, res, max_faces):
    import jax
    import jax.numpy as jnp

    from tsjax.geometry.marching import marching_tets
    from tsjax.geometry.render import render_trimesh
    from tsjax.geometry.tets import build_tet_grid
    from tsjax.render.camera import make_cameras

    host = build_tet_grid(n)
    sdf0 = jnp.asarray(wavy_sdf(host.verts))
    g = jax.device_put(host)
    del host  # keep only the device copy (the base memory then matches the PyTorch worker's tables)
    gc.collect()
    cams = make_cameras(jnp.full((views,), 20.0), jnp.arange(views) * 360.0 / views + 30.0, 1.5, 40.0)
    base = _start_memory()

    def extract(grid, sdf, pos):
        return marching_tets(pos, sdf, grid, max_faces=max_faces)

    def area(grid, sdf, pos):
        m = extract(grid, sdf, pos)
        p = m.verts[m.faces]
        cr = jnp.cross(p[:, 1] - p[:, 0], p[:, 2] - p[:, 0])
        return 0.5 * jnp.sum(jnp.sqrt(jnp.sum(cr * cr, -1) + 1e-20) * m.face_mask), m

    def rendered(grid, sdf, pos):
        m = extract(grid, sdf, pos)
        o = render_trimesh(m, lambda x: 0.5 + 0.8 * x, cams, res)
        return jnp.mean(o["color"]) + jnp.mean(o["mask"]), m

    if workload == "extract":
        fn = jax.jit(lambda grid, sdf, pos: (lambda m: (m.verts, m.faces, m.num_faces, m.num_verts, m.overflow))(
            extract(grid, sdf, pos)))
    elif workload == "extract_backward":
        fn = jax.jit(jax.value_and_grad(area, argnums=(1, 2), has_aux=True))
    else:
        fn = jax.jit(jax.value_and_grad(rendered, argnums=(1, 2), has_aux=True))
    args = (g, sdf0, g.verts)
    t0 = time.perf_counter()
    compiled = fn.lower(*args).compile()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = jax.block_until_ready(compiled(*args))
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    if workload == "extract":
        nf, nvv, ov, value = int(out[2]), int(out[3]), int(out[4]), None
    else:
        (value, m), _ = out
        nf, nvv, ov, value = int(m.num_faces), int(m.num_verts), int(m.overflow), float(value)
    return dict(impl="tsjax", jax_version=jax.__version__, faces=nf, verts=nvv, overflow=ov, max_faces=max_faces,
                **({"area": value} if workload == "extract_backward" else {"loss": value} if value is not None else {}),
                compile_s=round(compile_s, 4), **_stats(first, times), base_rss_bytes=base, peak_rss_bytes=_peak())


def check_parity(n):
    """Same faces in both implementations (as sets of sorted vertex-position triples, rounded)."""
    import torch

    from tsjax.geometry.marching import NUM_TRIS, TRI_TABLE, compact_mesh, marching_tets
    from tsjax.geometry.tets import build_tet_grid

    g = build_tet_grid(n)
    sdf = wavy_sdf(g.verts)
    vt, ft = torch_marching_tets(torch.from_numpy(g.verts), torch.from_numpy(sdf), torch.from_numpy(g.tets).long(),
                                 torch.from_numpy(TRI_TABLE).long(), torch.from_numpy(NUM_TRIS).long())
    m = marching_tets(g.verts, sdf, g, max_faces=8 * len(ft) + 1024)
    vj, fj = compact_mesh(m)

    def canon(v, f):  # oriented triangles, rotation-invariant: start at the smallest vertex key
        k = np.round(np.asarray(v, np.float64)[np.asarray(f)] * 1e5).astype(np.int64)  # [F,3,3]
        kk = k[..., 0] * 10 ** 12 + k[..., 1] * 10 ** 6 + k[..., 2]
        r = np.argmin(kk, axis=1)
        rolled = np.stack([np.roll(kk[i], -r[i]) for i in range(len(kk))]) if len(kk) else kk
        return set(map(tuple, rolled))

    return len(fj), len(ft), canon(vj, fj) == canon(vt.numpy(), ft.numpy())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--grids", default="64,128,192")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--views", type=int, default=2)
    ap.add_argument("--res", type=int, default=256)
    ap.add_argument("--workloads", default=",".join(WORKLOADS))
    ap.add_argument("--torch-threads", type=int, default=0,
                    help="torch.set_num_threads for the PyTorch worker (0 = PyTorch's default)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--grid", type=int, default=None, help=argparse.SUPPRESS)
    ap.add_argument("--workload", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--max-faces", type=int, default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker is not None:
        if a.worker == "torch":
            res = worker_torch(a.grid, a.workload, a.repeats, a.torch_threads)
        elif a.worker == "jax":
            res = worker_jax(a.grid, a.workload, a.repeats, a.views, a.res, a.max_faces)
        else:
            f, ft, same = check_parity(a.grid)
            res = dict(faces_tsjax=f, faces_torch=ft, same_faces=bool(same))
        print("RESULT " + json.dumps(res), flush=True)
        return

    try:
        grids = [int(x) for x in a.grids.split(",") if x]
        workloads = [w for w in a.workloads.split(",") if w]
    except ValueError:
        print(f"error: --grids must be comma-separated integers, got {a.grids!r}", file=sys.stderr)
        sys.exit(2)
    bad = [w for w in workloads if w not in WORKLOADS]
    if bad or not grids or min(grids) < 1 or a.repeats < 1:
        print(f"error: bad --workloads {bad} / --grids {a.grids!r} / --repeats {a.repeats}", file=sys.stderr)
        sys.exit(2)
    emit(kind="machine", cpu_count=os.cpu_count(), platform=platform.platform(), python=platform.python_version(),
         repeats=a.repeats, views=a.views, res=a.res, torch_threads=a.torch_threads)

    def child(*extra):
        cmd = [sys.executable, os.path.abspath(__file__), "--repeats", str(a.repeats), "--views", str(a.views),
               "--res", str(a.res), "--torch-threads", str(a.torch_threads), *map(str, extra)]
        p = subprocess.run(cmd, capture_output=True, text=True)
        for line in p.stdout.splitlines():
            if line.startswith("RESULT "):
                return json.loads(line[7:])
        return {"error": (p.stderr.strip().splitlines() or ["failed"])[-1]}

    from tsjax.geometry.tets import build_tet_grid, grid_counts

    for n in grids:
        build_tet_grid(n)  # make sure the cache exists before timing (children load it)
        counts = grid_counts(n)
        par = child("--worker", "parity", "--grid", n) if n <= 128 else None
        faces = None
        for w in workloads:
            t = None
            if w != "extract_render_backward":
                t = child("--worker", "torch", "--grid", n, "--workload", w)
                faces = t.get("faces", faces)
            cap = -(-int(1.25 * (faces or 6 * n * n * 4)) // 1024) * 1024
            j = child("--worker", "jax", "--grid", n, "--workload", w, "--max-faces", cap)
            row = dict(kind="dmtet", grid=n, workload=w, tets=counts["tets"], grid_verts=counts["verts"],
                       edges=counts["edges"], tsjax=j, torch=t)
            if t and "min_s" in t and "min_s" in j:
                row["torch_over_tsjax_min"] = round(t["min_s"] / j["min_s"], 3)
                row["torch_over_tsjax_median"] = round(t["median_s"] / j["median_s"], 3)
            if par is not None:
                row["parity"] = par
            emit(**row)


if __name__ == "__main__":
    main()
