"""``python -m tsjax.sample``: text-to-image / image-to-image with a latent diffusion model.

Examples::

    python -m tsjax.sample --model tiny --prompt "a toy house" --steps 10 --out out/
    python -m tsjax.sample --model path/to/sd-folder --prompt "a castle" --negative-prompt "blurry" \
        --cfg 7.5 --steps 50 --seed 0 --num-images 4 --out out/
    python -m tsjax.sample --model finetuned/ --prompt "..." --init-image view.png --strength 0.5 --out out/

``--model`` is a diffusers Stable Diffusion folder, a folder saved by ``python -m tsjax.finetune``, or
``tiny`` / ``tiny:SEED`` / ``tiny-camera[:SEED]`` (a small randomly initialised model; see
:func:`tsjax.diffusion.sampling.load_model`). Images are written as ``OUT/{i:03d}.png`` (sRGB PNG).
The whole denoising loop runs inside one ``jax.jit``; all randomness comes from ``--seed``.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tsjax.sample", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers folder, tsjax-saved folder, or 'tiny[:SEED]'")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="", help="prompt of the unconditional CFG branch")
    p.add_argument("--init-image", default=None, help="image-to-image: start from this image (PNG/JPEG)")
    p.add_argument("--strength", type=float, default=None,
                   help="image-to-image strength in [0, 1] (default 0.5 with --init-image)")
    p.add_argument("--cfg", type=float, default=7.5, help="classifier-free guidance scale (1 = off)")
    p.add_argument("--steps", type=int, default=50, help="number of DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-images", type=int, default=1)
    p.add_argument("--size", type=int, default=None, help="image side in pixels (default: model native)")
    p.add_argument("--camera", default=None,
                   help="camera condition: 16 comma-separated numbers (row-major c2w) for camera models")
    p.add_argument("--out", required=True, help="output folder")
    return p


def load_image(path: str | Path, size: int | None = None) -> np.ndarray:
    """Read an image file as ``[H, W, 3]`` float32 sRGB in [0, 1] (alpha composited on white);
    centre-cropped to a square and resized to ``size`` when given."""
    from PIL import Image

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: image file not found")
    try:
        im = Image.open(path)
        im.load()
    except Exception as e:  # PIL raises several types for unreadable files
        raise ValueError(f"{path}: not a readable image ({e})") from None
    if im.mode in ("RGBA", "LA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(bg, rgba)
    im = im.convert("RGB")
    if size is not None:
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        im = im.resize((size, size), Image.BICUBIC)
    return np.asarray(im, np.float32) / 255.0


def save_image(path: str | Path, img: np.ndarray) -> None:
    from PIL import Image

    Image.fromarray(np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)).save(path)


def parse_camera(text: str) -> np.ndarray:
    vals = [float(v) for v in text.replace(" ", "").split(",") if v]
    if len(vals) != 16:
        raise ValueError(f"--camera needs 16 comma-separated numbers (row-major 4x4 c2w), got {len(vals)}")
    return np.asarray(vals, np.float32)


def run(args: argparse.Namespace) -> list[Path]:
    import jax

    from tsjax.diffusion.sampling import generate, load_model

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.num_images < 1:
        raise ValueError(f"--num-images must be >= 1, got {args.num_images}")
    strength = args.strength
    if strength is not None and args.init_image is None:
        raise ValueError("--strength needs --init-image")
    if strength is None:
        strength = 0.5 if args.init_image else 1.0
    if not 0.0 <= strength <= 1.0:
        raise ValueError(f"--strength must be in [0, 1], got {strength}")
    camera = parse_camera(args.camera) if args.camera else None
    if args.init_image and not Path(args.init_image).is_file():
        raise FileNotFoundError(f"--init-image {args.init_image}: image file not found")
    model = load_model(args.model)
    size = args.size or model.sample_size * model.latent_factor
    if size % model.latent_factor:
        raise ValueError(f"--size {size} must be a multiple of {model.latent_factor}")
    init = None
    if args.init_image:
        init = np.repeat(load_image(args.init_image, size)[None], args.num_images, 0)
    cams = None if camera is None else np.repeat(camera[None], args.num_images, 0)
    images = generate(model, [args.prompt] * args.num_images, key=jax.random.key(args.seed),
                      negative_prompts=[args.negative_prompt] * args.num_images, steps=args.steps,
                      guidance_scale=args.cfg, eta=args.eta, height=size, width=size, init_images=init,
                      strength=strength, camera=cams)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, img in enumerate(images):
        paths.append(out / f"{i:03d}.png")
        save_image(paths[-1], img)
    (out / "sample.json").write_text(json.dumps({k: v for k, v in vars(args).items()}, indent=1))
    return paths


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        paths = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(paths)} image(s) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
