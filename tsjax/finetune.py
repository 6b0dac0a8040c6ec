"""``python -m tsjax.finetune``: DreamBooth-style / LoRA fine-tuning of a latent diffusion model.

Examples::

    # CPU preset: train a tiny random model from scratch on a few renders (VAE first, then UNet)
    python -m tsjax.finetune --model tiny --images renders/ --prompt "a toy house" --steps 300 --out prior/
    # full fine-tune of a Stable Diffusion folder, text encoder too, with a prior-preservation set
    python -m tsjax.finetune --model sd21/ --images views/ --prompt "a sks house" --train-text-encoder \
        --prior-images class/ --prior-prompt "a house" --steps 400 --lr 2e-6 --out ft/
    # LoRA (rank 8) + camera condition (camera embedding trained too)
    python -m tsjax.finetune --model sd21/ --images views/ --prompt "..." --lora-rank 8 \
        --camera-json cameras.json --out ft-lora/

``--images``: a folder of PNG/JPEG files (sorted by name), centre-cropped and resized to the model's
resolution (``--resolution``). ``--camera-json``: ``{"<file name>": [16 numbers, row-major c2w] or
[[4x4]]}`` for every image; each sample's camera is zeroed with probability ``--camera-dropout``
(0.1). A model without a camera embedding gets one (``camera_embed_dim=16``, freshly initialised).
``--model tiny`` (or ``tiny:SEED``) starts from random weights: the VAE is first trained as an
autoencoder on the images for ``--vae-steps`` steps (default: ``--steps`` for tiny models, 0 otherwise).

The result is saved to ``--out`` as a tsjax model folder (LoRA weights merged into the UNet) that
``--model`` of ``tsjax.sample`` / ``tsjax.finetune`` loads back: ``tsjax_model.json`` (configs), ``params/``
(an orbax checkpoint written by :func:`tsjax.diffusion.io.save_params`; folders from older versions with a
``params.msgpack`` still load), ``tokenizer/``, plus ``train_log.json``.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m tsjax.finetune", description=__doc__.split("\n")[0])
    p.add_argument("--model", required=True, help="diffusers folder, tsjax-saved folder, or 'tiny[:SEED]'")
    p.add_argument("--images", required=True, help="folder of training images")
    p.add_argument("--prompt", required=True, help="prompt of the training images")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-4 LoRA/tiny, 2e-6 full)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--out", required=True)
    p.add_argument("--lora-rank", type=int, default=0, help="> 0: train LoRA factors only (+ camera)")
    p.add_argument("--train-text-encoder", action="store_true")
    p.add_argument("--camera-json", default=None)
    p.add_argument("--camera-dropout", type=float, default=0.1)
    p.add_argument("--prior-images", default=None, help="prior-preservation (class) images folder")
    p.add_argument("--prior-prompt", default=None)
    p.add_argument("--prior-weight", type=float, default=1.0)
    p.add_argument("--resolution", type=int, default=None, help="training image side (default: native)")
    p.add_argument("--vae-steps", type=int, default=None, help="autoencoder steps before the UNet")
    p.add_argument("--bf16", action="store_true", help="bf16 forward/backward, fp32 master weights")
    p.add_argument("--seed", type=int, default=0)
    return p


def list_images(folder: str, what: str) -> list[Path]:
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"{what} {folder}: no such directory")
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in IMAGE_EXTS)
    if not files:
        raise ValueError(f"{what} {folder}: no images ({', '.join(IMAGE_EXTS)}) found")
    return files


def load_cameras(path: str, files: list[Path]) -> np.ndarray:
    """``[N, 16]`` float32 flattened c2w for each image file from the ``--camera-json`` mapping."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"--camera-json {path}: file not found")
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"--camera-json {path}: invalid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"--camera-json {path}: expected an object mapping image file names to c2w matrices")
    cams = []
    for f in files:
        if f.name not in data:
            raise ValueError(f"--camera-json {path}: no camera for image {f.name}")
        c = np.asarray(data[f.name], np.float32).reshape(-1)
        if c.size != 16:
            raise ValueError(f"--camera-json {path}: camera of {f.name} has {c.size} numbers, expected 16")
        cams.append(c)
    return np.stack(cams)


def _add_camera_embedding(model, key):
    """Give ``model`` a camera embedding (``camera_embed_dim=16``), keeping every existing weight."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    from tsjax.diffusion.sampling import DiffusionModel

    if not any(f.name == "camera_embed_dim" for f in dataclasses.fields(model.unet_config)):
        raise ValueError(f"--camera-json: the UNet of {model.source} has no camera_embed_dim option")
    ucfg = dataclasses.replace(model.unet_config, camera_embed_dim=16)
    shell = DiffusionModel(ucfg, model.vae_config, model.text_config, model.scheduler_config, model.tokenizer,
                           {}, model.source)
    s, L = model.sample_size, model.max_length
    fresh = jax.jit(shell.unet.init)(key, jnp.zeros((1, s, s, model.latent_channels)), jnp.zeros((1,), jnp.int32),
                                     jnp.zeros((1, L, int(ucfg.cross_attention_dim))), jnp.zeros((1, 16)))["params"]
    flat = traverse_util.flatten_dict(fresh)
    flat.update(traverse_util.flatten_dict(model.params["unet"]))
    return dataclasses.replace(shell, params={**model.params, "unet": traverse_util.unflatten_dict(flat)})


def run(args: argparse.Namespace) -> dict:
    import jax
    import jax.numpy as jnp
    import optax
    from tqdm import tqdm

    from tsjax.diffusion.sampling import load_model, save_model
    from tsjax.diffusion.train import (FinetuneConfig, TrainState, full_finetune, init_train_state,
                                       make_finetune_step, make_vae_step)
    from tsjax.sample import load_image

    if args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.lora_rank < 0:
        raise ValueError(f"--lora-rank must be >= 0, got {args.lora_rank}")
    if not 0.0 <= args.camera_dropout <= 1.0:
        raise ValueError(f"--camera-dropout must be in [0, 1], got {args.camera_dropout}")
    if (args.prior_images is None) != (args.prior_prompt is None):
        raise ValueError("--prior-images and --prior-prompt go together")
    files = list_images(args.images, "--images")
    prior_files = list_images(args.prior_images, "--prior-images") if args.prior_images else []
    cams = load_cameras(args.camera_json, files) if args.camera_json else None

    root = jax.random.key(args.seed)
    k_cam, k_lora, k_vae, k_train = jax.random.split(root, 4)
    model = load_model(args.model)
    from_scratch = args.model.split(":")[0] in ("tiny", "tiny-camera")
    if cams is not None and getattr(model.unet_config, "camera_embed_dim", None) is None:
        model = _add_camera_embedding(model, k_cam)
    res = args.resolution or model.sample_size * model.latent_factor
    if res % model.latent_factor:
        raise ValueError(f"--resolution {res} must be a multiple of {model.latent_factor}")
    images = np.stack([load_image(f, res) for f in files]) * 2.0 - 1.0  # [N, H, W, 3] in [-1, 1]
    prior = np.stack([load_image(f, res) for f in prior_files]) * 2.0 - 1.0 if prior_files else None
    lr = args.lr if args.lr is not None else (1e-4 if (args.lora_rank or from_scratch) else 2e-6)
    log: dict = {"args": vars(args), "lr": lr, "loss": [], "vae_loss": []}
    rng = np.random.default_rng(args.seed)
    B = args.batch_size

    def batch_idx(n):
        return rng.choice(n, B, replace=n < B)

    params = dict(model.params)
    # ---- 1. (from scratch) train the autoencoder on the images -----------------------------------
    vae_steps = args.vae_steps if args.vae_steps is not None else (args.steps if from_scratch else 0)
    if vae_steps > 0:
        vopt = optax.adam(1e-3 if from_scratch else lr)
        vstep = make_vae_step(model.vae_encode, model.vae_decode, vopt)
        vstate = TrainState(params=params["vae"], opt_state=vopt.init(params["vae"]), step=jnp.zeros((), jnp.int32))
        bar = tqdm(range(vae_steps), desc="vae", file=sys.stderr, dynamic_ncols=True)
        for _ in bar:
            vstate, m = vstep(vstate, jnp.asarray(images[batch_idx(len(images))]), k_vae)
            log["vae_loss"].append(float(m["loss"]))
            bar.set_postfix(loss=f"{log['vae_loss'][-1]:.4f}")
        params["vae"] = vstate.params

    # ---- 2. the denoiser ---------------------------------------------------------------------------
    if args.lora_rank > 0:
        from tsjax.diffusion.lora import init_lora, merge_lora

        params["lora"] = init_lora(k_lora, params["unet"], args.lora_rank, None)

        def trainable(path):
            return (path[0] == "lora" or (path[0] == "unet" and any("camera" in p for p in path))
                    or (args.train_text_encoder and path[0] == "text_encoder"))
    else:
        merge_lora = None
        trainable = full_finetune(args.train_text_encoder)

    def unet_fn(p, x, t, ctx, cam):
        up = p["unet"]
        if "lora" in p:
            up = merge_lora(up, p["lora"], 1.0)
        return model.unet_apply(up, x, t, ctx, cam)

    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=1e-2))
    cfg = FinetuneConfig(prior_weight=args.prior_weight, camera_dropout=args.camera_dropout,
                         compute_dtype=jnp.bfloat16 if args.bf16 else jnp.float32,
                         train_text_encoder=args.train_text_encoder)
    step = make_finetune_step(unet_fn, model.scheduler, opt, trainable, config=cfg,
                              text_apply=lambda p, ids: model.encode_text(p["text_encoder"], ids),
                              vae_encode=lambda p, x: model.vae_encode(p["vae"], x),
                              scaling_factor=model.scaling_factor)
    state = init_train_state(params, opt, trainable)
    ids = model.tokenize([args.prompt])
    prior_ids = model.tokenize([args.prior_prompt]) if prior is not None else None
    enc = jax.jit(model.encode_text)
    ctx = enc(params["text_encoder"], ids)
    prior_ctx = enc(params["text_encoder"], prior_ids) if prior is not None else None

    def make_batch():
        i = batch_idx(len(images))
        b = {"images": jnp.asarray(images[i])}
        if args.train_text_encoder:
            b["input_ids"] = jnp.repeat(ids, B, 0)
        else:
            b["context"] = jnp.repeat(ctx, B, 0)
        if cams is not None:
            b["camera"] = jnp.asarray(cams[i])
        if prior is not None:
            j = batch_idx(len(prior))
            b["prior_images"] = jnp.asarray(prior[j])
            if args.train_text_encoder:
                b["prior_input_ids"] = jnp.repeat(prior_ids, B, 0)
            else:
                b["prior_context"] = jnp.repeat(prior_ctx, B, 0)
            if cams is not None:
                b["prior_camera"] = jnp.zeros((B, 16), jnp.float32)
        return b

    t0 = time.perf_counter()
    state, m = step(state, make_batch(), k_train)
    log["compile_and_first_step_s"] = time.perf_counter() - t0
    log["loss"].append(float(m["loss"]))
    bar = tqdm(range(1, args.steps), desc="finetune", file=sys.stderr, dynamic_ncols=True, initial=1,
               total=args.steps)
    t1 = time.perf_counter()
    for _ in bar:
        state, m = step(state, make_batch(), k_train)
        log["loss"].append(float(m["loss"]))
        bar.set_postfix(loss=f"{np.mean(log['loss'][-20:]):.4f}")
    log["step_s"] = (time.perf_counter() - t1) / max(args.steps - 1, 1)

    # ---- 3. save (LoRA merged into the UNet) ------------------------------------------------------
    final = dict(state.params)
    if "lora" in final:
        final["unet"] = merge_lora(final["unet"], final.pop("lora"), 1.0)
    out = save_model(model, args.out, params=final)
    (out / "train_log.json").write_text(json.dumps(log, indent=1, default=str))
    return log


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log = run(args)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"saved fine-tuned model to {args.out} (final loss {np.mean(log['loss'][-10:]):.4f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
