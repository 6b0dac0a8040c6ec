"""Result files of a run: mesh export, turntables, loss curves, the HTML gallery, the manifest.

Images are written as 8-bit sRGB PNGs. Contact sheets tile ``[N,H,W,3]`` images in rows of ``cols``.
"""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any, Sequence

import numpy as np

__all__ = ["save_png", "contact_sheet", "save_gif", "loss_curve_png", "write_gallery", "write_json",
           "read_jsonl"]


def _u8(img: np.ndarray) -> np.ndarray:
    return (np.clip(np.asarray(img, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | Path, img: np.ndarray) -> Path:
    """Write an ``[H,W,3]`` (or ``[H,W,1]``) float image in [0, 1] as PNG."""
    from PIL import Image

    a = _u8(img)
    if a.ndim == 3 and a.shape[-1] == 1:
        a = a[..., 0]
    Image.fromarray(a).save(path)
    return Path(path)


def contact_sheet(images: np.ndarray, cols: int = 6, pad: int = 2, background: float = 1.0) -> np.ndarray:
    """Tile ``[N,H,W,3]`` into one image (rows of ``cols``; ``pad`` px of ``background`` between tiles)."""
    images = np.asarray(images, np.float32)
    n, h, w, c = images.shape
    cols = max(1, min(cols, n))
    rows = -(-n // cols)
    out = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), background, np.float32)
    for i in range(n):
        r, q = divmod(i, cols)
        out[pad + r * (h + pad):pad + r * (h + pad) + h, pad + q * (w + pad):pad + q * (w + pad) + w] = images[i]
    return out


def save_gif(path: str | Path, frames: np.ndarray, duration_ms: int = 80) -> Path:
    """Looping animated GIF of ``[N,H,W,3]`` frames."""
    from PIL import Image

    ims = [Image.fromarray(_u8(f)) for f in frames]
    ims[0].save(path, save_all=True, append_images=ims[1:], duration=duration_ms, loop=0)
    return Path(path)


def read_jsonl(path: str | Path) -> list[dict]:
    p = Path(path)
    if not p.is_file():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def loss_curve_png(path: str | Path, records: Sequence[dict], terms: Sequence[str], *, smooth: int = 10) -> Path:
    """Plot the named loss terms (moving average over ``smooth`` steps, log scale when positive)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    steps = np.asarray([r["step"] for r in records])
    for t in terms:
        v = np.asarray([r.get(t, np.nan) for r in records], np.float64)
        if not np.any(np.isfinite(v)) or np.nanmax(np.abs(v)) == 0:
            continue
        k = max(1, min(smooth, len(v)))
        vs = np.convolve(np.nan_to_num(v), np.ones(k) / k, mode="valid")
        ax.plot(steps[k - 1:], vs, label=t)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (moving average)")
    if all(r.get(t, 1.0) > 0 for r in records for t in terms if t in r):
        ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    Path(path).write_text(json.dumps(obj, indent=1, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))
    return Path(path)


def write_gallery(path: str | Path, *, title: str, exemplars: Sequence[str], concepts: Sequence[str],
                  chosen: Sequence[int], assets: Sequence[dict]) -> Path:
    """``index.html``: exemplar renders, concept images (chosen ones marked), and per asset the init
    model, the result turntables (colour, normal) and the exported files, side by side. Paths are
    relative to the gallery file."""
    esc = html.escape

    def img(src, cap, cls=""):
        return (f'<figure class="{cls}"><img src="{esc(src)}" loading="lazy"><figcaption>{esc(cap)}'
                f"</figcaption></figure>")

    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>"
             "body{font-family:sans-serif;margin:20px;background:#fafafa}figure{display:inline-block;margin:4px;"
             "vertical-align:top}img{max-width:360px;border:1px solid #ccc;background:#fff}"
             "figure.chosen img{border:3px solid #d33}.row{display:flex;gap:8px;align-items:flex-start;"
             "flex-wrap:wrap}figcaption{font-size:12px}</style></head><body>",
             f"<h1>{esc(title)}</h1>", "<h2>Exemplars</h2><div class='row'>"]
    parts += [img(e, f"exemplar {i}") for i, e in enumerate(exemplars)]
    parts.append("</div><h2>Concept images (stage 1; chosen in red)</h2><div class='row'>")
    parts += [img(c, f"concept {i}", "chosen" if i in chosen else "") for i, c in enumerate(concepts)]
    parts.append("</div>")
    for a in assets:
        parts.append(f"<h2>Asset {a['index']}</h2><div class='row'>")
        parts.append(img(a["concept"], "concept image"))
        parts.append(img(a["init"], "initial model"))
        if a.get("pseudo_views"):
            parts.append(img(a["pseudo_views"], "img2img pseudo-views"))
        parts.append(img(a["turntable_color"], "result (colour)"))
        parts.append(img(a["turntable_normal"], "result (normal)"))
        if a.get("loss_curve"):
            parts.append(img(a["loss_curve"], "losses"))
        links = " | ".join(f'<a href="{esc(f)}">{esc(Path(f).name)}</a>' for f in a.get("files", []))
        parts.append(f"</div><p>{links}</p>")
    parts.append("</body></html>")
    Path(path).write_text("\n".join(parts))
    return Path(path)
