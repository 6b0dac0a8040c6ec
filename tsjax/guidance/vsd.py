"""Variational score distillation (VSD, ProlificDreamer) as pure functions.

Everything here is generic over denoiser callables of the shape

    apply(params, x_t [B,h,w,C], t [B] int32, context [B,L,D], camera [B,16] | None) -> out [B,h,w,C]

whose raw output ``out`` is interpreted through a scheduler's ``prediction_type`` (``epsilon`` or
``v_prediction``; ``scheduler.predict_epsilon`` converts), and over ``vae_encode(params, x) -> (mean,
logvar)``. So the same code drives Stable Diffusion 2.1 and the tiny CPU models, and tests run on
hand-written toy denoisers.

One VSD term on latents ``z`` (``[B,h,w,C]``, already multiplied by the VAE scaling factor)::

    t ~ U{ceil(lo*T'), ..., floor(hi*T')} with T' = T - 1        (one t per sample)
    x_t = sqrt(abar_t) z + sqrt(1 - abar_t) noise
    eps_prior = CFG(prior(x_t, t, [uncond; cond]))  = u + s (c - u)   (one batched call of size 2B)
    eps_lora  = lora(x_t, t, cond, camera)                         (guidance scale 1)
    grad      = w(t) (eps_prior - eps_lora),  w(t) = 1 - abar_t
    loss_vsd  = 0.5 * sum_{h,w,C} (z - sg(z - grad))^2, averaged over the batch B

so ``d loss_vsd / d z = grad / B`` (exactly ``grad`` for B = 1; the official code's ``reduction="sum" /
batch_size`` convention). The prior and LoRA predictions carry no gradient.

The LoRA's own training loss is computed on the *detached* latents, with an independent
``t ~ U{0, ..., T-1}`` and noise, camera dropped (zeroed) with probability ``camera_dropout``, and the
scheduler's regression target (``v`` for v-prediction models, ``noise`` for epsilon models)::

    loss_lora = mean (lora(x_t', t', cond, camera') - target)^2

Its gradient reaches only the LoRA parameters; summing ``loss_vsd + loss_lora`` and differentiating once
w.r.t. (render params, LoRA params) therefore gives both updates, as in the official implementation.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.struct
import jax
import jax.numpy as jnp

__all__ = ["Denoiser", "VSDOut", "sample_timesteps", "cfg_prediction", "encode_latents", "vsd_term",
           "vsd_noise", "vsd_finish", "lora_noise", "lora_loss", "vsd_weight"]

Array = jax.Array


@flax.struct.dataclass
class Denoiser:
    """A denoiser and its parameters (a pytree: ``params`` are leaves, ``apply`` is static metadata).

    apply: ``(params, x_t, t, ctx, camera) -> out`` (see module docstring).
    params: parameter pytree passed as the first argument of ``apply``.
    """

    apply: Callable[..., Array] = flax.struct.field(pytree_node=False)
    params: Any = None


class VSDOut(NamedTuple):
    """Result of one VSD term (all float32).

    loss: scalar (see module docstring); grad: ``[B,h,w,C]`` the distillation gradient w.r.t. ``z``
    (times B); t: ``[B]`` int32 timesteps; noise: ``[B,h,w,C]``; eps_prior / eps_lora: the noise
    predictions; x_t: the noised latents.
    """

    loss: Array
    grad: Array
    t: Array
    noise: Array
    eps_prior: Array
    eps_lora: Array
    x_t: Array


def _expand(v: Array, ndim: int) -> Array:
    return v.reshape(v.shape + (1,) * (ndim - v.ndim))


def sample_timesteps(key: Array, n: int, t_range: tuple[float, float], num_train_timesteps: int) -> Array:
    """``[n]`` int32 timesteps uniform on ``{ceil(lo*(T-1)), ..., floor(hi*(T-1))}`` (inclusive)."""
    lo, hi = float(t_range[0]), float(t_range[1])
    T1 = num_train_timesteps - 1
    t_lo = int(-(-lo * T1 // 1))
    t_hi = max(int(hi * T1), t_lo)
    return jax.random.randint(key, (n,), t_lo, t_hi + 1, jnp.int32)


def vsd_weight(alphas_cumprod: Array, t: Array) -> Array:
    """VSD weighting ``w(t) = 1 - abar_t``, ``[B]``."""
    return 1.0 - alphas_cumprod[t]


def cfg_prediction(denoiser: Denoiser, x_t: Array, t: Array, cond: Array, uncond: Array, camera: Array | None,
                   guidance_scale: float) -> Array:
    """Classifier-free-guided raw prediction ``u + s (c - u)``; uncond/cond batched in one call.

    ``cond``/``uncond``: ``[B,L,D]``; ``camera``: ``[B,16]`` or None (same camera for both halves).
    A ``guidance_scale`` of 1 runs only the conditional branch.
    """
    if float(guidance_scale) == 1.0:
        return denoiser.apply(denoiser.params, x_t, t, cond, camera)
    cam2 = None if camera is None else jnp.concatenate([camera, camera], 0)
    out = denoiser.apply(denoiser.params, jnp.concatenate([x_t, x_t], 0), jnp.concatenate([t, t], 0),
                         jnp.concatenate([uncond, cond], 0), cam2)
    u, c = jnp.split(out, 2, axis=0)
    return u + guidance_scale * (c - u)


def encode_latents(vae_encode: Callable[[Any, Array], tuple[Array, Array]], vae_params: Any, images: Array,
                   scaling_factor: float) -> Array:
    """Latents of sRGB images ``[B,H,W,3]`` in [0, 1]: posterior mean of ``vae_encode(2x - 1)`` times
    ``scaling_factor``; differentiable w.r.t. ``images`` (this is the VAE encode "with gradient")."""
    mean, _ = vae_encode(vae_params, images * 2.0 - 1.0)
    return mean.astype(jnp.float32) * scaling_factor


def vsd_noise(key: Array, latents: Array, scheduler: Any, t_range: tuple[float, float]
              ) -> tuple[Array, Array, Array]:
    """The random part of a VSD term: ``(t [B] int32, noise [B,h,w,C], x_t)`` on detached ``latents``.

    Uses ``key`` exactly as :func:`vsd_term` does, so a fused implementation that draws with this
    function reproduces the per-term draws bit for bit.
    """
    B = latents.shape[0]
    k_t, k_n = jax.random.split(key)
    t = sample_timesteps(k_t, B, t_range, int(scheduler.num_train_timesteps))
    noise = jax.random.normal(k_n, latents.shape, jnp.float32)
    x_t = scheduler.add_noise(jax.lax.stop_gradient(latents), noise, t)
    return t, noise, x_t


def vsd_finish(latents: Array, t: Array, noise: Array, x_t: Array, out_prior: Array, out_lora: Array, *,
               scheduler: Any, lora_scheduler: Any = None) -> VSDOut:
    """The deterministic part of a VSD term from the raw CFG prior output and the raw LoRA output
    (both ``[B,h,w,C]``, any float dtype; converted to float32 before use). See :func:`vsd_term`."""
    B = latents.shape[0]
    eps_prior = scheduler.predict_epsilon(out_prior.astype(jnp.float32), t, x_t)
    lsched = scheduler if lora_scheduler is None else lora_scheduler
    eps_lora = lsched.predict_epsilon(jax.lax.stop_gradient(out_lora).astype(jnp.float32), t, x_t)
    w = _expand(vsd_weight(scheduler.alphas_cumprod, t), latents.ndim)
    grad = jax.lax.stop_gradient(jnp.nan_to_num(w * (eps_prior - eps_lora)))
    target = jax.lax.stop_gradient(latents - grad)
    loss = 0.5 * jnp.sum(jnp.square(latents - target)) / B
    return VSDOut(loss, grad, t, noise, jax.lax.stop_gradient(eps_prior), jax.lax.stop_gradient(eps_lora), x_t)


def vsd_term(key: Array, latents: Array, *, prior: Denoiser, lora: Denoiser, scheduler: Any, cond: Array,
             uncond: Array, camera: Array | None, t_range: tuple[float, float], guidance_scale: float,
             lora_cond: Array | None = None, lora_scheduler: Any = None) -> VSDOut:
    """One VSD term on ``latents`` ``[B,h,w,C]`` (see module docstring).

    Args:
      key: PRNG key (split into the timestep and noise draws).
      prior: the (fine-tuned) prior denoiser; its output is read with ``scheduler.prediction_type``.
      lora: the LoRA denoiser (``params`` = everything it reads; gradient is stopped here).
      scheduler: gives ``alphas_cumprod``, ``num_train_timesteps``, ``add_noise``, ``predict_epsilon``.
      cond / uncond: text embeddings ``[B,L,D]`` of the prompt / the empty prompt for the prior.
      camera: ``[B,16]`` camera condition (flattened c2w) for the LoRA (and the prior, if it takes one).
      t_range: (lo, hi) fractions of T.
      lora_cond: text embeddings for the LoRA (default ``cond``; differs when the LoRA has its own text
        encoder). lora_scheduler: the LoRA's scheduler if its prediction type differs (default ``scheduler``).
    """
    t, noise, x_t = vsd_noise(key, latents, scheduler, t_range)
    out_p = cfg_prediction(prior, x_t, t, cond, uncond, camera, guidance_scale)
    lora_sg = Denoiser(lora.apply, jax.lax.stop_gradient(lora.params))
    out_l = lora_sg.apply(lora_sg.params, x_t, t, cond if lora_cond is None else lora_cond, camera)
    return vsd_finish(latents, t, noise, x_t, out_p, out_l, scheduler=scheduler, lora_scheduler=lora_scheduler)


def lora_noise(key: Array, latents: Array, *, scheduler: Any, camera: Array | None, camera_dropout: float = 0.1
               ) -> tuple[Array, Array, Array, Array | None]:
    """The random part of :func:`lora_loss`: ``(t [B], x_t, target, camera')`` on detached ``latents``
    (same key use as :func:`lora_loss`, so fused and per-term implementations draw identically)."""
    B = latents.shape[0]
    T = int(scheduler.num_train_timesteps)
    k_t, k_n, k_c = jax.random.split(key, 3)
    z = jax.lax.stop_gradient(latents)
    t = jax.random.randint(k_t, (B,), 0, T, jnp.int32)
    noise = jax.random.normal(k_n, z.shape, jnp.float32)
    x_t = scheduler.add_noise(z, noise, t)
    target = scheduler.training_target(z, noise, t)
    if camera is not None and camera_dropout > 0:
        keep = jax.random.bernoulli(k_c, 1.0 - camera_dropout, (B,))
        camera = camera * keep[:, None].astype(camera.dtype)
    return t, x_t, target, camera


def lora_loss(key: Array, latents: Array, *, lora: Denoiser, scheduler: Any, cond: Array, camera: Array | None,
              camera_dropout: float = 0.1) -> Array:
    """The LoRA's denoising loss on detached ``latents`` ``[B,h,w,C]`` (see module docstring).

    ``t ~ U{0..T-1}``, target from ``scheduler.training_target`` (v for v-prediction, noise for
    epsilon), each sample's ``camera`` zeroed with probability ``camera_dropout``. Returns a scalar
    whose gradient reaches only ``lora.params``.
    """
    t, x_t, target, camera = lora_noise(key, latents, scheduler=scheduler, camera=camera,
                                        camera_dropout=camera_dropout)
    pred = lora.apply(lora.params, x_t, t, jax.lax.stop_gradient(cond), camera)
    return jnp.mean(jnp.square(pred.astype(jnp.float32) - target))
