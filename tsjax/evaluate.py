"""``python -m tsjax.evaluate``: metrics and an HTML report for generated 3D assets.

Usage::

    python -m tsjax.evaluate --results DIR [DIR ...] [--exemplars DIR|builtin:NAME]
        [--clip DIR] [--vgg FILE] [--vgg16 FILE] [--lpips FILE] [--aesthetic FILE]
        [--prompt TEXT] [--views N] [--res PX] [--voxel-res N] --out DIR

Each results directory is one method (or ablation); every ``*.glb`` below it is one asset (named by
its path relative to the directory, without suffix). Every asset and exemplar is loaded with
``tsjax.data.mesh.load_mesh`` (normalised into the unit cube) and rendered with
``tsjax.render.mesh_render.render_mesh`` from fixed cameras: ``--views`` azimuths evenly spaced from
0 degrees, alternating elevation 0 / 20 degrees, distance 2.2, fovy 40, white background.

Metrics (per asset unless noted; "not computed: ..." instead of a number when inputs are missing):

- ``novelty_iou``: min over exemplars of 1 - voxel IoU (``--voxel-res``, default 64). [exemplars]
- ``chamfer_to_exemplars``: min over exemplars of the symmetric chamfer distance (unit-cube units).
- ``palette_distance``: sliced-W1 Lab distance between the asset's and the exemplars' foreground colours
  in unlit (albedo) renders.
- ``contextual_distance``: VGG19 relu3_4 contextual loss (h = 0.5) between each view and the exemplar
  renders from the same camera, min over exemplars, mean over views. [--vgg]
- ``clip_score_text``: mean over views of 100 * max(cos(image, text), 0). [--clip and a prompt: --prompt,
  or NAME.txt beside NAME.glb]
- ``clip_score_exemplars``: 100 * max(cos, 0) between the mean (normalised) CLIP embeddings of the
  asset's views and of all exemplar views. [--clip]
- ``aesthetic``: LAION aesthetic score, mean over views. [--clip (ViT-L/14) and --aesthetic]
- per method: ``diversity_iou`` (mean pairwise 1 - IoU), ``diversity_lpips`` (mean over asset pairs
  and views of LPIPS between renders from the same camera) [--lpips (+ --vgg16)].

Outputs in ``--out``: ``metrics.json``, ``report.html`` (render strips, per-method tables, a summary
table), ``renders/*.png`` and ``plots/*.png`` (bar charts of the numeric means).
"""
from __future__ import annotations

import argparse
import html
import itertools
import json
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from tsjax.metrics.result import MetricResult

PER_ASSET = ("novelty_iou", "chamfer_to_exemplars", "palette_distance", "contextual_distance",
             "clip_score_text", "clip_score_exemplars", "aesthetic")
PER_METHOD = ("diversity_iou", "diversity_lpips")
LOWER_IS_BETTER = {"chamfer_to_exemplars", "palette_distance", "contextual_distance"}


@dataclass(frozen=True)
class EvalSettings:
    """Fixed evaluation settings (recorded in metrics.json)."""

    n_views: int = 8
    resolution: int = 256
    voxel_res: int = 64
    chamfer_points: int = 10000
    distance: float = 2.2
    fovy: float = 40.0
    elevations: tuple = (0.0, 20.0)

    def cameras(self):
        """Fixed evaluation cameras: azimuth k * 360 / n, elevation alternating over ``elevations``."""
        from tsjax.render.camera import make_cameras

        n = self.n_views
        az = np.arange(n, dtype=np.float32) * (360.0 / n)
        el = np.asarray([self.elevations[k % len(self.elevations)] for k in range(n)], np.float32)
        return make_cameras(el, az, np.full(n, self.distance, np.float32), np.full(n, self.fovy, np.float32))


# ----------------------------------------------------------------------------------------------------
# Inputs


def find_results(dirs: list[str]) -> dict[str, tuple[Path, list[Path]]]:
    """``{method name: (dir, sorted GLB paths)}``; the name is the directory's basename (made unique)."""
    out: dict[str, tuple[Path, list[Path]]] = {}
    for d in dirs:
        p = Path(d)
        if not p.is_dir():
            raise FileNotFoundError(f"--results: directory not found: {p}")
        glbs = sorted(p.rglob("*.glb"))
        if not glbs:
            raise ValueError(f"--results: no .glb files under {p}")
        name = p.resolve().name or "results"
        base, k = name, 2
        while name in out:
            name, k = f"{base}-{k}", k + 1
        out[name] = (p, glbs)
    return out


def asset_name(root: Path, path: Path) -> str:
    return path.relative_to(root).with_suffix("").as_posix()


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def render_views(mesh, settings: EvalSettings, cams) -> dict[str, np.ndarray]:
    """Shaded colour and unlit albedo (sRGB, white background) [V,H,W,3] and mask [V,H,W,1] from ``cams``.

    The shaded colour (head-light Lambert) feeds the image metrics and the report; the unlit albedo
    feeds the palette distance, so shading does not count as a colour difference.
    """
    from tsjax.render.mesh_render import render_mesh

    r = settings.resolution
    out = render_mesh(mesh, cams, (r, r), background=(1.0, 1.0, 1.0))
    flat = render_mesh(mesh, cams, (r, r), background=(1.0, 1.0, 1.0), lighting="none")
    return {"color": np.clip(np.asarray(out["color"], np.float32), 0, 1),
            "albedo": np.clip(np.asarray(flat["color"], np.float32), 0, 1),
            "mask": np.asarray(out["mask"], np.float32)}


def save_strip(images: np.ndarray, path: Path) -> None:
    """Tile [V,H,W,3] in [0,1] side by side into one PNG."""
    from PIL import Image

    strip = np.concatenate(list(images), axis=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray((np.clip(strip, 0, 1) * 255 + 0.5).astype(np.uint8)).save(path)


# ----------------------------------------------------------------------------------------------------
# Learned models (loaded once; a missing file becomes a reason, never a number)


@dataclass
class Models:
    vgg: object = None          # (module, variables) or reason str
    lpips: object = None        # LPIPS or reason str
    clip: object = None         # CLIP or reason str
    aesthetic: object = None    # AestheticHead or reason str


def _missing(path, flag: str) -> str:
    return f"weights missing at {path if path is not None else '(no ' + flag + ' given)'}"


def load_models(args) -> Models:
    m = Models()
    if args.vgg and Path(args.vgg).is_file():
        from tsjax.metrics.vgg import load_vgg

        m.vgg = load_vgg(args.vgg, "vgg19", ("relu3_4",))
    else:
        m.vgg = _missing(args.vgg, "--vgg")
    if not (args.lpips and Path(args.lpips).is_file()):
        m.lpips = _missing(args.lpips, "--lpips")
    elif args.vgg16 is not None and not Path(args.vgg16).is_file():
        m.lpips = _missing(args.vgg16, "--vgg16")
    else:
        from tsjax.metrics.lpips import load_lpips, lpips_file_has_backbone

        if args.vgg16 is None and not lpips_file_has_backbone(args.lpips):
            m.lpips = _missing(None, "--vgg16")
        else:
            m.lpips = load_lpips(args.lpips, args.vgg16)
    if args.clip and Path(args.clip).is_dir():
        from tsjax.metrics.clip import load_clip

        m.clip = load_clip(args.clip)
    else:
        m.clip = _missing(args.clip, "--clip")
    if args.aesthetic and Path(args.aesthetic).is_file():
        from tsjax.metrics.aesthetic import load_aesthetic_head

        m.aesthetic = load_aesthetic_head(args.aesthetic)
    else:
        m.aesthetic = _missing(args.aesthetic, "--aesthetic")
    return m


# ----------------------------------------------------------------------------------------------------
# Evaluation


def _contextual_fn(vgg):
    """Jitted ``(views [V,H,W,3], exemplar views [E,V,H,W,3]) -> mean_v min_e CX loss`` (relu3_4, h=0.5)."""
    import jax
    import jax.numpy as jnp

    from tsjax.metrics.vgg import contextual_loss

    module, variables = vgg

    @jax.jit
    def fn(views, ex_views):
        fa = module.apply(variables, views)["relu3_4"]
        fe = jax.vmap(lambda e: module.apply(variables, e)["relu3_4"])(ex_views)
        losses = jax.lax.map(lambda f: contextual_loss(fa, f), fe)  # [E, V]
        return jnp.mean(jnp.min(losses, axis=0))

    return fn


def evaluate(args) -> dict:
    """Run the whole evaluation described in the module docstring; returns the metrics.json dict."""
    import jax.numpy as jnp

    from tsjax.data.mesh import load_exemplars, load_mesh
    from tsjax.metrics import geometric as geo
    from tsjax.metrics.clip import clip_score

    settings = EvalSettings(n_views=args.views, resolution=args.res, voxel_res=args.voxel_res,
                            chamfer_points=args.chamfer_points)
    out = Path(args.out)
    methods = find_results(args.results)
    models = load_models(args)
    cams = settings.cameras()
    t0 = time.time()

    # Exemplars
    ex = None
    if args.exemplars:
        ex_meshes = load_exemplars(args.exemplars)
        if not ex_meshes:
            raise ValueError(f"--exemplars: no meshes in {args.exemplars}")
        ex_renders = [render_views(m, settings, cams) for m in ex_meshes]
        ex_names = [getattr(m, "name", "") or f"exemplar_{i}" for i, m in enumerate(ex_meshes)]
        ex_imgs = []
        for i, (n, r) in enumerate(zip(ex_names, ex_renders)):
            rel = f"renders/exemplars/{i:02d}_{_slug(n)}.png"
            save_strip(r["color"], out / rel)
            ex_imgs.append(rel)
        ex = dict(meshes=ex_meshes, renders=ex_renders, names=ex_names, images=ex_imgs,
                  grids=[geo.voxelize(m, settings.voxel_res) for m in ex_meshes],
                  colors=np.concatenate([r["color"] for r in ex_renders]),
                  albedo=np.concatenate([r["albedo"] for r in ex_renders]),
                  masks=np.concatenate([r["mask"] for r in ex_renders]))
        if not isinstance(models.clip, str):
            e = np.asarray(models.clip.image_embeds(ex["colors"]))
            ex["clip_mean"] = e.mean(0, keepdims=True)
    no_ex = "no --exemplars given"

    report: dict = {"version": 1, "settings": asdict(settings),
                    "weights": {"vgg": args.vgg, "vgg16": args.vgg16, "lpips": args.lpips,
                                "clip": args.clip, "aesthetic": args.aesthetic},
                    "exemplars": None if ex is None else {"source": args.exemplars, "names": ex["names"],
                                                          "images": ex["images"]},
                    "methods": {}}
    for method, (root, glbs) in methods.items():
        assets: dict[str, dict] = {}
        images: dict[str, str] = {}
        grids, renders = [], []
        for path in glbs:
            name = asset_name(root, path)
            mesh = load_mesh(path)
            r = render_views(mesh, settings, cams)
            renders.append(r)
            rel = f"renders/{_slug(method)}/{_slug(name)}.png"
            save_strip(r["color"], out / rel)
            images[name] = rel
            g = geo.voxelize(mesh, settings.voxel_res)
            grids.append(g)
            res: list[MetricResult] = []
            if ex is None:
                res += [MetricResult.not_computed(k, no_ex) for k in
                        ("novelty_iou", "chamfer_to_exemplars", "palette_distance")]
            else:
                res.append(MetricResult.ok("novelty_iou", geo.novelty([g], ex["grids"])[0]))
                pts = geo.sample_surface(mesh, settings.chamfer_points)
                res.append(MetricResult.ok("chamfer_to_exemplars", min(
                    geo.chamfer_distance(pts, geo.sample_surface(m, settings.chamfer_points))
                    for m in ex["meshes"])))
                res.append(MetricResult.ok("palette_distance", geo.palette_distance(
                    r["albedo"], ex["albedo"], r["mask"], ex["masks"])))
            # Contextual distance
            if isinstance(models.vgg, str):
                res.append(MetricResult.not_computed("contextual_distance", models.vgg))
            elif ex is None:
                res.append(MetricResult.not_computed("contextual_distance", no_ex))
            else:
                if "cx_fn" not in ex:
                    ex["cx_fn"] = _contextual_fn(models.vgg)
                    ex["stacked"] = np.stack([e["color"] for e in ex["renders"]])
                res.append(MetricResult.ok("contextual_distance", float(ex["cx_fn"](r["color"], ex["stacked"]))))
            # CLIP
            prompt = args.prompt
            side = path.with_suffix(".txt")
            if side.is_file():
                prompt = side.read_text().strip() or prompt
            if isinstance(models.clip, str):
                res += [MetricResult.not_computed(k, models.clip)
                        for k in ("clip_score_text", "clip_score_exemplars", "aesthetic")]
            else:
                emb = np.asarray(models.clip.image_embeds(r["color"]))
                if prompt:
                    t = models.clip.text_embeds(models.clip.tokenize([prompt]))
                    res.append(MetricResult.ok("clip_score_text", float(jnp.mean(clip_score(emb, t)))))
                else:
                    res.append(MetricResult.not_computed(
                        "clip_score_text", f"no prompt (use --prompt or {side.name})"))
                if ex is None:
                    res.append(MetricResult.not_computed("clip_score_exemplars", no_ex))
                else:
                    res.append(MetricResult.ok("clip_score_exemplars",
                                               float(clip_score(emb.mean(0, keepdims=True), ex["clip_mean"])[0, 0])))
                if isinstance(models.aesthetic, str):
                    res.append(MetricResult.not_computed("aesthetic", models.aesthetic))
                elif models.aesthetic.in_dim != emb.shape[1]:
                    res.append(MetricResult.not_computed(
                        "aesthetic", f"head expects {models.aesthetic.in_dim}-d CLIP embeddings, "
                        f"{args.clip} gives {emb.shape[1]}-d (use CLIP ViT-L/14)"))
                else:
                    res.append(MetricResult.ok("aesthetic", float(jnp.mean(models.aesthetic(emb)))))
            assets[name] = {m.name: m.to_json() for m in res}
        # Per-method metrics
        per_method: list[MetricResult] = []
        div = geo.pairwise_diversity(grids)
        per_method.append(MetricResult.ok("diversity_iou", div) if div is not None
                          else MetricResult.not_computed("diversity_iou", "fewer than 2 assets"))
        if isinstance(models.lpips, str):
            per_method.append(MetricResult.not_computed("diversity_lpips", models.lpips))
        elif len(renders) < 2:
            per_method.append(MetricResult.not_computed("diversity_lpips", "fewer than 2 assets"))
        else:
            vals = [float(jnp.mean(models.lpips(renders[i]["color"], renders[j]["color"])))
                    for i, j in itertools.combinations(range(len(renders)), 2)]
            per_method.append(MetricResult.ok("diversity_lpips", float(np.mean(vals))))
        means = {}
        for k in PER_ASSET:
            vals = [a[k] for a in assets.values()]
            nums = [v for v in vals if isinstance(v, float)]
            means[k] = float(np.mean(nums)) if len(nums) == len(vals) else next(v for v in vals if isinstance(v, str))
        report["methods"][method] = {"results_dir": str(root), "assets": assets, "images": images,
                                     "method": {m.name: m.to_json() for m in per_method}, "mean": means}
    report["seconds"] = round(time.time() - t0, 2)
    return report


# ----------------------------------------------------------------------------------------------------
# Report


def write_plots(report: dict, out: Path) -> dict[str, str]:
    """One bar chart per numeric metric: methods side by side (or assets when there is one method)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plots = {}
    methods = report["methods"]
    for k in PER_ASSET + PER_METHOD:
        if len(methods) > 1 or k in PER_METHOD:
            labels = list(methods)
            vals = [(methods[m]["mean"] | methods[m]["method"]).get(k) for m in labels]
        else:
            (only,) = methods.values()
            labels = list(only["assets"])
            vals = [only["assets"][a][k] for a in labels]
        pairs = [(lab, v) for lab, v in zip(labels, vals) if isinstance(v, float)]
        if not pairs:
            continue
        fig, ax = plt.subplots(figsize=(max(3.0, 0.8 * len(pairs) + 1.5), 2.8), dpi=100)
        ax.bar(range(len(pairs)), [v for _, v in pairs], color="#4C72B0")
        ax.set_xticks(range(len(pairs)), [lab for lab, _ in pairs], rotation=30, ha="right", fontsize=8)
        ax.set_title(k + (" (lower is better)" if k in LOWER_IS_BETTER else ""), fontsize=9)
        fig.tight_layout()
        rel = f"plots/{k}.png"
        (out / "plots").mkdir(parents=True, exist_ok=True)
        fig.savefig(out / rel)
        plt.close(fig)
        plots[k] = rel
    return plots


def _cell(v) -> str:
    if isinstance(v, float):
        return f"<td class='num'>{v:.4g}</td>"
    return f"<td class='nc' title='{html.escape(str(v))}'>{html.escape(str(v))}</td>"


def write_html(report: dict, plots: dict[str, str], out: Path) -> Path:
    """Write report.html (relative links to renders/ and plots/)."""
    e = html.escape
    s = report["settings"]
    parts = ["<!doctype html><html><head><meta charset='utf-8'><title>tsjax evaluation</title><style>",
             "body{font-family:sans-serif;margin:16px;color:#222} table{border-collapse:collapse;margin:8px 0}",
             "td,th{border:1px solid #ccc;padding:3px 6px;font-size:12px} th{background:#f0f0f0}",
             ".num{text-align:right;font-family:monospace} .nc{color:#a33;font-size:11px;max-width:220px;overflow-wrap:anywhere}",
             "img.strip{height:96px;border:1px solid #ddd} img.plot{margin:4px;border:1px solid #eee}",
             "</style></head><body><h1>tsjax evaluation</h1>",
             f"<p>{s['n_views']} views at {s['resolution']} px (azimuths evenly spaced, elevations "
             f"{e(str(s['elevations']))}, distance {s['distance']}, fovy {s['fovy']}); voxel IoU at "
             f"{s['voxel_res']}<sup>3</sup>; {len(report['methods'])} method(s).</p>"]
    if report["exemplars"]:
        parts.append(f"<h2>Exemplars ({e(str(report['exemplars']['source']))})</h2>")
        for n, img in zip(report["exemplars"]["names"], report["exemplars"]["images"]):
            parts.append(f"<div>{e(n)}<br><img class='strip' src='{e(img)}' alt='{e(n)}'></div>")
    parts.append("<h2>Summary (mean over assets)</h2><table><tr><th>method</th>")
    parts += [f"<th>{k}</th>" for k in PER_ASSET + PER_METHOD] + ["</tr>"]
    for m, d in report["methods"].items():
        row = d["mean"] | d["method"]
        parts.append(f"<tr><td>{e(m)}</td>" + "".join(_cell(row[k]) for k in PER_ASSET + PER_METHOD) + "</tr>")
    parts.append("</table>")
    if plots:
        parts.append("<h2>Plots</h2><div>")
        parts += [f"<img class='plot' src='{e(p)}' alt='{e(k)}'>" for k, p in plots.items()]
        parts.append("</div>")
    for m, d in report["methods"].items():
        parts.append(f"<h2>Method: {e(m)}</h2><p>{e(d['results_dir'])}</p><table><tr><th>asset</th>"
                     "<th>renders</th>" + "".join(f"<th>{k}</th>" for k in PER_ASSET) + "</tr>")
        for a, vals in d["assets"].items():
            img = d["images"][a]
            parts.append(f"<tr><td>{e(a)}</td><td><img class='strip' src='{e(img)}' alt='{e(a)}'></td>"
                         + "".join(_cell(vals[k]) for k in PER_ASSET) + "</tr>")
        parts.append("</table>")
    parts.append("</body></html>")
    path = out / "report.html"
    path.write_text("\n".join(parts))
    return path


# ----------------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tsjax.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--results", nargs="+", required=True, help="result dirs (one per method) holding *.glb")
    p.add_argument("--exemplars", default=None, help="exemplar dir or builtin:NAME")
    p.add_argument("--clip", default=None, help="transformers CLIPModel folder (ViT-L/14 for --aesthetic)")
    p.add_argument("--vgg", default=None, help="torchvision VGG19 weights (.pth/.safetensors)")
    p.add_argument("--vgg16", default=None, help="torchvision VGG16 weights for LPIPS (unless --lpips holds them)")
    p.add_argument("--lpips", default=None, help="lpips 'vgg.pth' linear layers (or a full LPIPS state dict)")
    p.add_argument("--aesthetic", default=None, help="LAION aesthetic head (.pth)")
    p.add_argument("--prompt", default=None, help="text for clip_score_text (NAME.txt beside a GLB overrides)")
    p.add_argument("--views", type=int, default=8)
    p.add_argument("--res", type=int, default=256)
    p.add_argument("--voxel-res", type=int, default=64)
    p.add_argument("--chamfer-points", type=int, default=10000)
    p.add_argument("--out", required=True, help="output dir for metrics.json, report.html, renders, plots")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        for flag, v in (("--views", args.views), ("--res", args.res), ("--voxel-res", args.voxel_res),
                        ("--chamfer-points", args.chamfer_points)):
            if v < (2 if flag == "--voxel-res" else 1):
                raise ValueError(f"{flag} must be positive, got {v}")
        if args.res < 32:
            raise ValueError(f"--res must be >= 32 (VGG/LPIPS need 32 px), got {args.res}")
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        report = evaluate(args)
        plots = write_plots(report, out)
        report["plots"] = plots
        (out / "metrics.json").write_text(json.dumps(report, indent=2))
        path = write_html(report, plots, out)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out / 'metrics.json'} and {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
