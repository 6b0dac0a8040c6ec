"""Image priors of the pipeline: base model, fine-tuning on renders, sampling, img2img, ranking.

All priors of one run share the base model's VAE, text encoder and noise schedule (so their latents
and prompt embeddings live in one space, which the shared VSD LoRA needs); they differ in UNet weights:

* ``model="tiny"``: :func:`tsjax.diffusion.sampling.tiny_model` with a camera embedding; its VAE is
  first trained as an autoencoder on the exemplar renders (``vae_steps``), its text encoder stays
  random (frozen), and every UNet is trained from scratch / from the theme prior on the renders.
* ``model="weights"``: the Stable Diffusion folder of ``--weights`` (a fresh camera embedding is added);
  every prior is a full DreamBooth fine-tune of its UNet.
* any other string: a diffusers or tsjax model folder.

Images are sRGB ``[N,H,W,3]`` float32 in [0, 1]; cameras are ``[N,16]`` flattened c2w.
"""
from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from tsjax.config import PriorTrainConfig

__all__ = ["load_base", "train_vae", "encode_images", "encode_prompts", "finetune_unet", "prompt_rows",
           "sample_images", "denoise_scores", "foreground_mask"]


def load_base(cfg: PriorTrainConfig, weights: str | None, key: jax.Array, *, seed: int = 0):
    """The base :class:`~tsjax.diffusion.sampling.DiffusionModel` of the run (camera-conditioned)."""
    from tsjax.diffusion.sampling import load_model, tiny_model

    if cfg.model == "tiny":
        return tiny_model(seed, camera=True)
    spec = weights if cfg.model == "weights" else cfg.model
    if spec is None:
        raise ValueError("this config needs pretrained weights: pass --weights DIR (a local Stable Diffusion "
                         "2.1-base folder)")
    model = load_model(spec)
    if getattr(model.unet_config, "camera_embed_dim", None) is None:
        from tsjax.finetune import _add_camera_embedding

        model = _add_camera_embedding(model, key)
    return model


def _batches(n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    return rng.choice(n, batch, replace=n < batch)


def train_vae(model, images: np.ndarray, steps: int, key: jax.Array, *, batch_size: int = 8, lr: float = 1e-3,
              progress: Callable[[str, int], Any] | None = None):
    """Train the model's VAE as an autoencoder on ``images`` (tiny models); returns the updated model."""
    from tsjax.diffusion.train import TrainState, make_vae_step

    if steps <= 0:
        return model
    opt = optax.adam(lr)
    vstep = make_vae_step(model.vae_encode, model.vae_decode, opt)
    p = model.params["vae"]
    state = TrainState(params=p, opt_state=opt.init(p), step=jnp.zeros((), jnp.int32))
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    x = np.asarray(images, np.float32) * 2.0 - 1.0
    for i in range(steps):
        state, _ = vstep(state, jnp.asarray(x[_batches(len(x), batch_size, rng)]), key)
        if progress:
            progress("vae", i)
    return dataclasses.replace(model, params={**model.params, "vae": state.params})


def encode_images(model, images: np.ndarray, *, chunk: int = 8) -> jax.Array:
    """Scaled VAE posterior-mean latents ``[N,h,w,C]`` of sRGB images ``[N,H,W,3]`` in [0, 1]."""
    enc = jax.jit(lambda p, x: model.vae_encode(p, x * 2.0 - 1.0)[0] * model.scaling_factor)
    out = [enc(model.params["vae"], jnp.asarray(images[i:i + chunk], jnp.float32))
           for i in range(0, len(images), chunk)]
    return jnp.concatenate(out, 0)


def encode_prompts(model, prompts: Sequence[str]) -> jax.Array:
    """Text embeddings ``[len(prompts), L, D]`` with the model's (shared, frozen) text encoder."""
    from tsjax.diffusion.sampling import encode_prompts as enc

    return enc(model, list(prompts))


def finetune_unet(model, unet_params: Any, images: np.ndarray, prompts: Sequence[str], cameras: np.ndarray | None,
                  cfg: PriorTrainConfig, steps: int, key: jax.Array, *, lr: float | None = None,
                  progress: Callable[[str, int], Any] | None = None, desc: str = "prior",
                  state_out: dict | None = None, resume_state: Any = None) -> Any:
    """Fine-tune (or train from scratch) a UNet on ``images`` with per-image ``prompts`` and ``cameras``.

    Full fine-tune of the UNet (DreamBooth without prior preservation, as the official code), AdamW with
    ``cfg.lr`` (or ``lr``), gradient clipping at 1, camera dropout ``cfg.camera_dropout``; the VAE and
    text encoder are frozen (latents and prompt embeddings are computed once). Returns the UNet params.
    ``resume_state``/``state_out``: continue from / hand back the :class:`TrainState` (so a schedule can
    be split in two phases with the same optimiser state, as the concept prior does).
    With ``cfg.prompt_dropout = p`` each drawn sample is trained on the empty prompt ``""`` with
    probability p (host-side draws from ``key``, so a run is reproducible), which teaches a from-scratch
    prior the unconditional prediction that classifier-free guidance uses.
    """
    from tsjax.diffusion.train import FinetuneConfig, init_train_state, make_finetune_step

    latents = encode_images(model, images)
    p_drop = cfg.prompt_dropout
    uniq = sorted(set(prompts) | ({""} if p_drop > 0 else set()))
    table = encode_prompts(model, uniq)
    pid = np.asarray([uniq.index(p) for p in prompts])
    lr = cfg.lr if lr is None else lr
    opt = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(lr, weight_decay=1e-2))
    trainable = lambda path: path[0] == "unet"  # noqa: E731
    use_cam = cameras is not None and cfg.camera
    step = make_finetune_step(lambda p, x, t, c, cam: model.unet_apply(p["unet"], x, t, c, cam), model.scheduler,
                              opt, trainable, config=FinetuneConfig(camera_dropout=cfg.camera_dropout))
    if resume_state is None:  # copy: the step donates its state, the caller keeps ``unet_params``
        state = init_train_state({"unet": jax.tree_util.tree_map(jnp.copy, unet_params)}, opt, trainable)
    else:
        state = resume_state
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    cams = None if not use_cam else jnp.asarray(cameras, jnp.float32)
    empty = uniq.index("") if p_drop > 0 else -1
    for i in range(steps):
        idx = _batches(len(images), cfg.batch_size, rng)
        batch = {"latents": latents[idx], "context": table[prompt_rows(pid[idx], rng, p_drop, empty)]}
        if cams is not None:
            batch["camera"] = cams[idx]
        state, m = step(state, batch, key)
        if progress:
            progress(desc, i)
        if (i % 25 == 0 or i == steps - 1) and not np.isfinite(float(m["loss"])):
            raise FloatingPointError(f"{desc} fine-tune: non-finite loss at step {i}")
    if state_out is not None:
        state_out["state"] = state
    return state.params["unet"]


def prompt_rows(rows: np.ndarray, rng: np.random.Generator, p_drop: float, empty: int) -> np.ndarray:
    """Prompt-table rows ``[n]`` of a training batch with each replaced by the empty prompt's row ``empty``
    with probability ``p_drop`` (independent draws from ``rng``; unchanged, and ``rng`` untouched, when
    ``p_drop`` is 0)."""
    if p_drop <= 0:
        return rows
    return np.where(rng.random(len(rows)) < p_drop, empty, rows)


def sample_images(model, unet_params: Any, prompts: Sequence[str], key: jax.Array, *, resolution: int,
                  steps: int, guidance_scale: float, cameras: np.ndarray | None = None,
                  init_images: np.ndarray | None = None, strength: float = 1.0, chunk: int = 4) -> np.ndarray:
    """Text-to-image (or img2img with ``init_images`` and ``strength``) with a fine-tuned UNet.

    Returns sRGB ``[N,H,W,3]`` float32 numpy in [0, 1]. Chunks of ``chunk`` prompts share one sampler.
    """
    from tsjax.diffusion.sampling import generate

    params = {**model.params, "unet": unet_params}
    out = []
    for i in range(0, len(prompts), chunk):
        sl = slice(i, i + chunk)
        n = len(prompts[sl])
        pad = chunk - n  # constant batch size -> one compilation
        ps = list(prompts[sl]) + [prompts[sl][-1]] * pad
        cam = None if cameras is None else np.concatenate([cameras[sl], np.repeat(cameras[sl][-1:], pad, 0)])
        init = None if init_images is None else np.concatenate(
            [init_images[sl], np.repeat(init_images[sl][-1:], pad, 0)])
        imgs = generate(model, ps, key=jax.random.fold_in(key, i), steps=steps, guidance_scale=guidance_scale,
                        height=resolution, width=resolution, camera=None if cam is None else jnp.asarray(cam),
                        init_images=None if init is None else jnp.asarray(init), strength=strength, params=params)
        out.append(np.asarray(imgs)[:n])
    return np.concatenate(out, 0)


def foreground_mask(images: np.ndarray, background=(1.0, 1.0, 1.0), threshold: float = 0.08) -> np.ndarray:
    """Foreground ``[N,H,W]`` bool: pixels farther than ``threshold`` (max abs channel) from the background."""
    return np.max(np.abs(np.asarray(images) - np.asarray(background, np.float32)), axis=-1) > threshold


def denoise_scores(model, unet_params: Any, images: np.ndarray, prompt: str, key: jax.Array,
                   cameras: np.ndarray | None = None, *, n_draws: int = 8) -> np.ndarray:
    """Per-image denoising loss ``[N]`` under a prior (lower = more typical for the prior)."""
    from tsjax.diffusion.train import make_denoise_loss

    lat = encode_images(model, images)
    ctx = encode_prompts(model, [prompt])
    f = make_denoise_loss(lambda p, x, t, c, cam: model.unet_apply(p, x, t, c, cam), model.scheduler,
                          n_draws=n_draws)
    out = []
    for i in range(len(images)):
        cam = None if cameras is None else jnp.asarray(cameras[i:i + 1], jnp.float32)
        out.append(float(f(unet_params, lat[i:i + 1], ctx, jax.random.fold_in(key, 0), cam)))
    return np.asarray(out, np.float32)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)
