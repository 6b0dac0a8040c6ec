"""``python -m tsjax.render``: render exemplar meshes to colour / normal / mask PNGs + cameras.json.

Usage:
  python -m tsjax.render --exemplars DIR|builtin[:NAME] --views 30 --res 256 --out DIR [--seed 0] [--ortho]

Writes, per mesh ``k`` (sorted file order, or built-in order) in ``OUT/<k>_<name>/``:
``color_XXX.png`` (sRGB), ``normal_XXX.png`` (world normals, 0.5 n + 0.5), ``mask_XXX.png``; and
``OUT/cameras.json`` plus ``OUT/contact_sheet.png`` (rows = meshes, colour then normal of up to 8 views).
User errors print ``error: ...`` on stderr and exit with status 2.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

MAX_RES = 4096
CAMERA_CONVENTIONS = (
    "c2w: 4x4 camera-to-world, row-major, OpenGL camera frame (camera looks down -Z, +Y up, +X right); "
    "world frame glTF (+Y up), meshes normalised to the unit cube [-0.5,0.5]^3; proj: 4x4 OpenGL "
    "projection (camera -> clip, NDC in [-1,1], z=-1 at near); elevation deg (>0 above the XZ plane), "
    "azimuth deg (0 = camera on +Z, 90 = on +X), distance from the origin, fovy deg (null for "
    "orthographic, then ortho_half_height is set); images row 0 = top; colour sRGB; normals world-space "
    "encoded 0.5*n+0.5 on a white background.")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tsjax.render", description=__doc__.split("\n")[0])
    p.add_argument("--exemplars", required=True, help="directory of GLB/glTF/OBJ files, or builtin[:NAME]")
    p.add_argument("--views", type=int, default=30, help="views per mesh (default 30)")
    p.add_argument("--res", type=int, default=256, help="square image resolution in pixels (default 256)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--seed", type=int, default=0, help="random seed for camera azimuths")
    p.add_argument("--ortho", action="store_true", help="30-view orthographic orbit (official code) instead of "
                   "paper cameras (elevation 0/20, random azimuth)")
    p.add_argument("--backend", default="auto", choices=["auto", "ref", "ffi", "nvdiffrast"])
    return p


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", s).strip("-") or "mesh"


def _png(path: Path, img: np.ndarray) -> None:
    from PIL import Image

    a = np.clip(np.asarray(img, np.float32), 0, 1)
    if a.shape[-1] == 1:
        a = a[..., 0]
    Image.fromarray(np.round(a * 255).astype(np.uint8)).save(path)


def run(args) -> dict:
    import jax
    from tqdm import tqdm

    from tsjax.data.mesh import load_exemplars
    from tsjax.data.renders import render_exemplar_views

    if not 1 <= args.res <= MAX_RES:
        raise ValueError(f"--res must be between 1 and {MAX_RES}, got {args.res}")
    if args.views < 1:
        raise ValueError(f"--views must be >= 1, got {args.views}")
    if not args.exemplars.startswith("builtin") and not Path(args.exemplars).exists():
        raise FileNotFoundError(f"--exemplars {args.exemplars}: no such directory")
    meshes = load_exemplars(args.exemplars)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tqdm(total=len(meshes), desc="rendering exemplars", unit="mesh", file=sys.stderr) as bar:
        r = render_exemplar_views(meshes, args.views, args.res, jax.random.key(args.seed),
                                  mode="ortho" if args.ortho else "paper", backend=args.backend,
                                  progress=lambda i: bar.update(1))
    meta = dict(conventions=CAMERA_CONVENTIONS, exemplars=args.exemplars, resolution=args.res,
                views=args.views, mode="ortho" if args.ortho else "paper", seed=args.seed, meshes=[])
    sheet_rows = []
    for k, m in enumerate(meshes):
        d = out / f"{k:02d}_{_slug(m.name)}"
        d.mkdir(exist_ok=True)
        views = []
        for j in range(args.views):
            _png(d / f"color_{j:03d}.png", r["color"][k, j])
            _png(d / f"normal_{j:03d}.png", r["normal"][k, j])
            _png(d / f"mask_{j:03d}.png", r["mask"][k, j])
            p = {n: float(r["params"][n][k, j]) for n in r["params"]}
            views.append(dict(
                index=j, color=f"{d.name}/color_{j:03d}.png", normal=f"{d.name}/normal_{j:03d}.png",
                mask=f"{d.name}/mask_{j:03d}.png",
                c2w=np.asarray(r["cams"].c2w[k, j]).tolist(), proj=np.asarray(r["cams"].proj[k, j]).tolist(),
                elevation=p["elevation"], azimuth=p["azimuth"], distance=p["distance"],
                fovy=None if np.isnan(p["fovy"]) else p["fovy"],
                ortho_half_height=None if np.isnan(p["ortho_half_height"]) else p["ortho_half_height"]))
        meta["meshes"].append(dict(name=m.name, dir=d.name, faces=m.num_faces, views=views))
        nv = min(8, args.views)
        sheet_rows.append(np.concatenate([np.concatenate(list(r["color"][k, :nv]), 1),
                                          np.concatenate(list(r["normal"][k, :nv]), 1)], 1))
    _png(out / "contact_sheet.png", np.concatenate(sheet_rows, 0))
    (out / "cameras.json").write_text(json.dumps(meta, indent=1))
    print(f"wrote {len(meshes)} x {args.views} views to {out}")
    return meta


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
