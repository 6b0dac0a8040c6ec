"""Classifier-free-guided latent diffusion sampling, the whole denoising loop inside one ``jit``.

Two layers:

* :func:`make_sampler` is model-agnostic. It takes a denoiser
  ``denoise_fn(params, x [B,h,w,C], t [B] int32, context [B,L,D], camera [B,16] | None) -> [B,h,w,C]``
  (the raw model output: noise or v, as the scheduler's ``prediction_type`` says) and returns a jitted
  ``run(params, cond, uncond, key, init_latents=None, camera=None) -> latents``. The timestep loop is a
  ``lax.fori_loop`` over a static-length table, so a sampler compiles once per (shape, steps, strength).
* :func:`generate` runs the full text-to-image / image-to-image pipeline on a loaded model bundle
  (tokenise -> CLIP text encoder -> sampler -> VAE decode).

Guidance: ``out = uncond + guidance_scale * (cond - uncond)``; with ``guidance_scale == 1`` the
unconditional branch is skipped. Image-to-image follows diffusers' ``StableDiffusionImg2ImgPipeline``:
``init = min(int(steps * strength), steps)`` steps are run, starting at index ``steps - init`` of the
``steps``-entry timestep table, after noising the init latents to that first timestep with
``scheduler.add_noise``; ``strength == 0`` returns the init latents unchanged.

Images are NHWC float32; latents are ``[B, H/8, W/8, 4]`` already multiplied by the VAE's
``scaling_factor``. Randomness comes only from the explicit ``key``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.diffusion.schedulers import DDIMScheduler, DDPMScheduler

__all__ = ["img2img_start", "make_sampler", "cfg_combine", "generate", "encode_prompts"]

DenoiseFn = Callable[..., jax.Array]


def img2img_start(num_inference_steps: int, strength: float) -> int:
    """Index into the ``num_inference_steps`` timestep table where image-to-image starts.

    As diffusers: ``init = min(int(n * strength), n)``, start ``= max(n - init, 0)``; strength 1 gives 0
    (pure text-to-image), strength 0 gives ``n`` (no denoising step at all).
    """
    if not 0.0 <= float(strength) <= 1.0:
        raise ValueError(f"strength must be in [0, 1], got {strength}")
    n = int(num_inference_steps)
    init = min(int(n * float(strength)), n)
    return max(n - init, 0)


def cfg_combine(out_uncond: jax.Array, out_cond: jax.Array, guidance_scale: float) -> jax.Array:
    """Classifier-free guidance ``u + s (c - u)``."""
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def make_sampler(
    denoise_fn: DenoiseFn,
    scheduler: DDIMScheduler | DDPMScheduler,
    *,
    latent_shape: Sequence[int],
    steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    strength: float = 1.0,
) -> Callable[..., jax.Array]:
    """Build a jitted sampler ``run(params, cond, uncond, key, init_latents=None, camera=None)``.

    Args:
      denoise_fn: ``(params, x, t, context, camera) -> model_output`` (see module docstring).
      scheduler: a :class:`DDIMScheduler` (``eta`` 0 = deterministic) or :class:`DDPMScheduler`.
      latent_shape: ``(B, h, w, C)`` of the latents produced.
      steps: number of inference steps of the timestep table (``scheduler.set_timesteps(steps)``).
      guidance_scale: CFG scale; 1.0 disables the unconditional branch (``uncond`` is ignored).
      eta: DDIM stochasticity (ignored for DDPM, which is always ancestral).
      strength: image-to-image strength in [0, 1]; < 1 requires ``init_latents`` when calling ``run``.

    ``run`` arguments: ``cond``/``uncond`` text embeddings ``[B, L, D]``; ``key`` a PRNG key (initial
    noise, DDIM eta noise, DDPM noise); ``init_latents`` ``[B, h, w, C]`` (scaled) for image-to-image;
    ``camera`` ``[B, 16]`` or None. The unconditional branch sees the same camera as the conditional one.
    Returns the final latents ``[B, h, w, C]`` float32.
    """
    timesteps_all = scheduler.set_timesteps(steps)
    start = img2img_start(steps, strength)
    ts_np = timesteps_all[start:]
    n_run = len(ts_np)
    if isinstance(scheduler, DDPMScheduler):
        prev_np = np.concatenate([timesteps_all[1:], [-1]])[start:].astype(np.int32)
    else:
        prev_np = (ts_np - scheduler.num_train_timesteps // steps).astype(np.int32)
    shape = tuple(int(s) for s in latent_shape)
    use_cfg = float(guidance_scale) != 1.0

    def model_out(params, x, t, cond, uncond, camera):
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        if not use_cfg:
            return denoise_fn(params, x, tb, cond, camera)
        cam2 = None if camera is None else jnp.concatenate([camera, camera], 0)
        out = denoise_fn(params, jnp.concatenate([x, x], 0), jnp.concatenate([tb, tb], 0),
                         jnp.concatenate([uncond, cond], 0), cam2)
        u, c = jnp.split(out, 2, axis=0)
        return cfg_combine(u, c, guidance_scale)

    def run(params, cond, uncond, key, init_latents=None, camera=None):
        k_init, k_loop = jax.random.split(key)
        noise = jax.random.normal(k_init, shape, jnp.float32)
        if start > 0 or strength < 1.0:
            if init_latents is None:
                raise ValueError(f"strength={strength} < 1 needs init_latents (image-to-image)")
            if n_run == 0:
                return init_latents.astype(jnp.float32)
            x = scheduler.add_noise(init_latents.astype(jnp.float32), noise,
                                    jnp.full((shape[0],), int(ts_np[0]), jnp.int32))
        else:
            x = noise * 1.0  # init_noise_sigma is 1 for DDPM/DDIM
        ts = jnp.asarray(ts_np)
        prevs = jnp.asarray(prev_np)

        def body(i, x):
            t = ts[i]
            out = model_out(params, x, t, cond, uncond, camera).astype(jnp.float32)
            k = jax.random.fold_in(k_loop, i)
            if isinstance(scheduler, DDPMScheduler):
                return scheduler.step(out, t, x, key=k, prev_t=prevs[i]).prev_sample
            if eta == 0:
                return scheduler.step(out, t, x, num_inference_steps=steps).prev_sample
            return scheduler.step(out, t, x, num_inference_steps=steps, eta=eta, key=k).prev_sample

        return jax.lax.fori_loop(0, n_run, body, x)

    jitted = jax.jit(run)
    jitted.timesteps = ts_np  # the timesteps actually run, for inspection/tests
    return jitted


# ----------------------------------------------------------------------------------------------
# Full pipeline on a loaded model bundle
# ----------------------------------------------------------------------------------------------


def encode_prompts(model: Any, prompts: Sequence[str]) -> jax.Array:
    """Tokenise (pad/truncate to the tokenizer's max length) and run the CLIP text encoder.

    Returns ``last_hidden_state`` ``[len(prompts), L, D]`` float32.
    """
    ids = model.tokenize(list(prompts))
    return model.encode_text(model.params["text_encoder"], ids)


def generate(
    model: Any,
    prompts: Sequence[str],
    *,
    key: jax.Array,
    negative_prompts: Sequence[str] | None = None,
    steps: int = 50,
    guidance_scale: float = 7.5,
    eta: float = 0.0,
    height: int | None = None,
    width: int | None = None,
    init_images: jax.Array | None = None,
    strength: float = 1.0,
    camera: jax.Array | None = None,
    params: Any = None,
) -> np.ndarray:
    """Text-to-image (or image-to-image) with a :class:`tsjax.diffusion.pipeline`-style model bundle.

    ``model`` provides ``params`` (dict with ``unet``, ``vae``, ``text_encoder``), ``scheduler``,
    ``tokenize(list[str]) -> int32 [B, L]``, ``encode_text(p, ids) -> [B, L, D]``,
    ``unet_apply(p, x, t, ctx, camera) -> out``, ``vae_encode(p, images) -> (mean, logvar)``,
    ``vae_decode(p, z) -> images``, ``scaling_factor``, ``latent_factor`` and ``sample_size``.
    ``init_images``: ``[B, H, W, 3]`` in [0, 1] (img2img; ``H, W`` multiples of ``latent_factor``).
    Returns images ``[B, H, W, 3]`` float32 in [0, 1] (numpy).
    """
    params = model.params if params is None else params
    B = len(prompts)
    f = model.latent_factor
    if init_images is not None:
        init_images = jnp.asarray(init_images, jnp.float32)
        if init_images.shape[0] != B:
            raise ValueError(f"got {init_images.shape[0]} init images for {B} prompts")
        height, width = int(init_images.shape[1]), int(init_images.shape[2])
    height = height or model.sample_size * f
    width = width or model.sample_size * f
    if height % f or width % f:
        raise ValueError(f"image size {height}x{width} must be a multiple of {f}")
    k_enc, k_sample = jax.random.split(key)
    cond = encode_prompts(model, prompts)
    uncond = encode_prompts(model, list(negative_prompts) if negative_prompts else [""] * B)
    init_latents = None
    if init_images is not None:
        mean, logvar = model.vae_encode(params["vae"], init_images * 2.0 - 1.0)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(k_enc, mean.shape, mean.dtype)
        init_latents = z * model.scaling_factor
    elif strength < 1.0:
        raise ValueError("strength < 1 needs an init image")
    shape = (B, height // f, width // f, model.latent_channels)
    sampler = make_sampler(
        lambda p, x, t, ctx, cam: model.unet_apply(p, x, t, ctx, cam),
        model.scheduler, latent_shape=shape, steps=steps, guidance_scale=guidance_scale, eta=eta,
        strength=strength,
    )
    latents = sampler(params["unet"], cond, uncond, k_sample, init_latents, camera)
    decode = jax.jit(lambda p, z: model.vae_decode(p, z / model.scaling_factor))
    images = decode(params["vae"], latents)
    return np.asarray(jnp.clip(images * 0.5 + 0.5, 0.0, 1.0))
