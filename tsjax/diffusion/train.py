"""Denoiser fine-tuning: full (DreamBooth-style), LoRA-only, or from scratch, as one jitted step.

The step is a pure function ``step(state, frozen, batch, key) -> (state, metrics)`` compiled once
(``jax.jit`` with the state donated). Parameters live in one nested dict ``state.params`` (e.g.
``{"unet": ..., "text_encoder": ..., "lora": ...}``); a static predicate ``trainable(path) -> bool`` over
the flattened key paths splits it into a trainable part, which gets gradients and optimizer state,
and a frozen part, which is never differentiated nor touched (so LoRA-only training leaves the base
weights bit-identical). This is ``optax.masked`` done by partition: no gradient or optimizer state is
ever allocated for frozen leaves.

Loss (epsilon or v targets, from the scheduler's ``prediction_type``)::

    t ~ U{0, ..., T-1},  noise ~ N(0, I),  x_t = add_noise(x0, noise, t)
    L = mean |unet(x_t, t, ctx, camera) - target|^2  (+ prior_weight * same on the prior batch)

Batch (dict of arrays; ``B`` instance samples, optional ``P`` prior-preservation samples):
  ``latents [B,h,w,4]`` (already scaled) **or** ``images [B,H,W,3]`` in [-1, 1] (encoded with the frozen
  VAE inside the step, sampling the posterior), ``input_ids [B,L] int32`` (text encoder run inside the
  step) **or** ``context [B,L,D]``, optional ``camera [B,16]``; prior samples under the same names
  prefixed ``prior_``. With ``camera_dropout = p`` each sample's camera is zeroed with probability p.

``compute_dtype=jnp.bfloat16`` runs the forward/backward in bf16 while the master parameters, the
gradients fed to the optimizer and the loss stay float32.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import flax.struct
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from tsjax.diffusion.schedulers import DDIMScheduler, DDPMScheduler

__all__ = [
    "TrainState",
    "FinetuneConfig",
    "init_train_state",
    "make_finetune_step",
    "split_params",
    "merge_params",
    "lora_only",
    "full_finetune",
    "make_denoise_loss",
    "make_vae_step",
]

Path = tuple[str, ...]


@flax.struct.dataclass
class TrainState:
    """``params``: full nested param dict (float32 master copy); ``opt_state``: optimizer state of the
    trainable leaves only (a flat ``{path: array}`` pytree); ``step``: int32 scalar."""

    params: Any
    opt_state: Any
    step: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class FinetuneConfig:
    """Static options of the fine-tune step.

    prior_weight: weight of the prior-preservation loss (used when the batch has ``prior_*`` keys).
    camera_dropout: probability of replacing a sample's camera condition by zeros.
    compute_dtype: dtype of the forward/backward pass (params are cast; masters stay float32).
    train_text_encoder: recompute the text embeddings from ``input_ids`` with gradients.
    """

    prior_weight: float = 1.0
    camera_dropout: float = 0.1
    compute_dtype: Any = jnp.float32
    train_text_encoder: bool = False


def lora_only(path: Path) -> bool:
    """Trainable predicate for LoRA fine-tuning: LoRA factors and the camera embedding."""
    return path[0] == "lora" or any("camera" in p for p in path)


def full_finetune(train_text_encoder: bool = False) -> Callable[[Path], bool]:
    """Trainable predicate for full fine-tuning: the UNet (and optionally the text encoder)."""

    def pred(path: Path) -> bool:
        return path[0] == "unet" or (train_text_encoder and path[0] == "text_encoder")

    return pred


def split_params(params: Mapping, trainable: Callable[[Path], bool]) -> tuple[dict, dict]:
    """Flatten ``params`` and split the leaves into ``(trainable, frozen)`` flat ``{path: leaf}`` dicts."""
    flat = traverse_util.flatten_dict(dict(params))
    train = {k: v for k, v in flat.items() if trainable(k)}
    frozen = {k: v for k, v in flat.items() if not trainable(k)}
    return train, frozen


def merge_params(train: Mapping, frozen: Mapping) -> dict:
    """Inverse of :func:`split_params`: the nested param dict."""
    return traverse_util.unflatten_dict({**frozen, **train})


def init_train_state(params: Mapping, optimizer: optax.GradientTransformation,
                     trainable: Callable[[Path], bool]) -> TrainState:
    """Fresh state: float32 master params, optimizer state over the trainable leaves only."""
    params = jax.tree_util.tree_map(lambda x: jnp.asarray(x, jnp.float32), dict(params))
    train, _ = split_params(params, trainable)
    if not train:
        raise ValueError("no trainable parameters: the trainable predicate selected nothing")
    return TrainState(params=params, opt_state=optimizer.init(train), step=jnp.zeros((), jnp.int32))


def _cast(tree, dtype):
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, tree)


def make_finetune_step(
    unet_apply: Callable[..., jax.Array],
    scheduler: DDIMScheduler | DDPMScheduler,
    optimizer: optax.GradientTransformation,
    trainable: Callable[[Path], bool],
    *,
    config: FinetuneConfig = FinetuneConfig(),
    text_apply: Callable[[Any, jax.Array], jax.Array] | None = None,
    vae_encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]] | None = None,
    scaling_factor: float = 0.18215,
) -> Callable[[TrainState, Any, Mapping[str, jax.Array], jax.Array], tuple[TrainState, dict]]:
    """Build the jitted, state-donating fine-tune step.

    Args:
      unet_apply: ``(params, x [N,h,w,4], t [N] int32, ctx [N,L,D], camera [N,16] | None) -> [N,h,w,4]``
        where ``params`` is the *whole* nested param dict (so LoRA/camera parts can be read from it).
      scheduler: gives ``num_train_timesteps``, ``add_noise`` and the target (epsilon or v).
      optimizer: optax transformation applied to the trainable leaves.
      trainable: static predicate over flattened param paths (:func:`lora_only`, :func:`full_finetune`).
      text_apply: ``(params, input_ids) -> ctx``, reading ``params["text_encoder"]``; needed when the
        batch carries ``input_ids``.
      vae_encode: ``(params, images in [-1,1]) -> (mean, logvar)`` reading ``params["vae"]``; needed when
        the batch carries ``images``.

    Returns ``step(state, batch, key) -> (new_state, metrics)`` with metrics ``loss`` (total),
    ``loss_instance``, ``loss_prior`` and ``grad_norm`` (float32 scalars). The per-step key is
    ``fold_in(key, state.step)``; ``state`` is donated.
    """
    cfg = config
    T = scheduler.num_train_timesteps

    def latents_of(params, batch, prefix, key):
        if prefix + "latents" in batch:
            return batch[prefix + "latents"].astype(jnp.float32)
        if vae_encode is None:
            raise ValueError(f"batch has no '{prefix}latents' and no vae_encode was given for '{prefix}images'")
        mean, logvar = vae_encode(jax.lax.stop_gradient(params), batch[prefix + "images"])
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return jax.lax.stop_gradient(z.astype(jnp.float32) * scaling_factor)

    def context_of(params, batch, prefix):
        if prefix + "context" in batch:
            return batch[prefix + "context"]
        if text_apply is None:
            raise ValueError(f"batch has no '{prefix}context' and no text_apply for '{prefix}input_ids'")
        ctx = text_apply(params, batch[prefix + "input_ids"])
        return ctx if cfg.train_text_encoder else jax.lax.stop_gradient(ctx)

    def loss_fn(train, frozen, batch, key):
        params32 = merge_params(train, frozen)
        params = _cast(params32, cfg.compute_dtype)
        prefixes = [""] + (["prior_"] if any(k.startswith("prior_") for k in batch) else [])
        xs, ctxs, cams, sizes = [], [], [], []
        k_lat, k_noise, k_t, k_cam = jax.random.split(key, 4)
        for j, pre in enumerate(prefixes):
            x0 = latents_of(params32, batch, pre, jax.random.fold_in(k_lat, j))
            xs.append(x0)
            ctxs.append(context_of(params, batch, pre))
            sizes.append(x0.shape[0])
            if pre + "camera" in batch:
                cams.append(batch[pre + "camera"])
        x0 = jnp.concatenate(xs, 0)
        ctx = jnp.concatenate(ctxs, 0)
        n = x0.shape[0]
        camera = None
        if cams:
            if len(cams) != len(prefixes):
                raise ValueError("camera given for only one of the instance / prior batches")
            camera = jnp.concatenate(cams, 0).astype(jnp.float32)
            if cfg.camera_dropout > 0:
                keep = jax.random.bernoulli(k_cam, 1.0 - cfg.camera_dropout, (n,))
                camera = camera * keep[:, None].astype(camera.dtype)
        noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
        t = jax.random.randint(k_t, (n,), 0, T, jnp.int32)
        x_t = scheduler.add_noise(x0, noise, t)
        target = scheduler.training_target(x0, noise, t)
        pred = unet_apply(params, x_t.astype(cfg.compute_dtype), t, ctx.astype(cfg.compute_dtype),
                          None if camera is None else camera.astype(cfg.compute_dtype))
        err = jnp.mean(jnp.square(pred.astype(jnp.float32) - target), axis=(1, 2, 3))
        l_inst = jnp.mean(err[: sizes[0]])
        l_prior = jnp.mean(err[sizes[0]:]) if len(sizes) > 1 else jnp.zeros((), jnp.float32)
        loss = l_inst + cfg.prior_weight * l_prior
        return loss, (l_inst, l_prior)

    def step(state: TrainState, batch: Mapping[str, jax.Array], key: jax.Array):
        train, frozen = split_params(state.params, trainable)
        k = jax.random.fold_in(key, state.step)
        (loss, (li, lp)), grads = jax.value_and_grad(loss_fn, has_aux=True)(train, frozen, batch, k)
        updates, opt_state = optimizer.update(grads, state.opt_state, train)
        train = optax.apply_updates(train, updates)
        new = TrainState(params=merge_params(train, frozen), opt_state=opt_state, step=state.step + 1)
        metrics = {"loss": loss, "loss_instance": li, "loss_prior": lp, "grad_norm": optax.tree.norm(grads)}
        return new, metrics

    return jax.jit(step, donate_argnums=(0,))


def make_denoise_loss(
    unet_apply: Callable[..., jax.Array],
    scheduler: DDIMScheduler | DDPMScheduler,
    *,
    n_draws: int = 8,
) -> Callable[..., jax.Array]:
    """Jitted evaluation loss ``loss(params, latents, context, key, camera=None) -> scalar``.

    Averages the denoising MSE over ``n_draws`` fixed (key-determined) draws of (t, noise) per sample,
    i.e. a low-variance estimate used by tests and progress reports to compare checkpoints.
    """
    T = scheduler.num_train_timesteps

    def loss(params, latents, context, key, camera=None):
        def one(k):
            kn, kt = jax.random.split(k)
            noise = jax.random.normal(kn, latents.shape, jnp.float32)
            t = jax.random.randint(kt, (latents.shape[0],), 0, T, jnp.int32)
            pred = unet_apply(params, scheduler.add_noise(latents, noise, t), t, context, camera)
            return jnp.mean(jnp.square(pred - scheduler.training_target(latents, noise, t)))

        return jnp.mean(jax.lax.map(one, jax.random.split(key, n_draws)))

    return jax.jit(loss)


def make_vae_step(
    vae_encode: Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]],
    vae_decode: Callable[[Any, jax.Array], jax.Array],
    optimizer: optax.GradientTransformation,
    *,
    kl_weight: float = 1e-6,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, dict]]:
    """Jitted, donated autoencoder step for training a tiny VAE from scratch (CPU preset).

    ``state.params`` is the VAE param dict (all trainable). Loss = mean squared reconstruction error of
    ``decode(mean + std * eps)`` against the input images ``[B,H,W,3]`` in [-1, 1], plus ``kl_weight``
    times the mean KL of the diagonal-Gaussian posterior to N(0, I) (as in SD's VAE, tiny weight).
    Returns ``step(state, images, key) -> (state, {"loss", "recon", "kl"})``.
    """

    def loss_fn(params, images, key):
        mean, logvar = vae_encode(params, images)
        logvar = jnp.clip(logvar, -30.0, 20.0)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        recon = jnp.mean(jnp.square(vae_decode(params, z) - images))
        kl = 0.5 * jnp.mean(jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
        return recon + kl_weight * kl, (recon, kl)

    def step(state: TrainState, images: jax.Array, key: jax.Array):
        k = jax.random.fold_in(key, state.step)
        (loss, (recon, kl)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, images, k)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        return TrainState(params=params, opt_state=opt_state, step=state.step + 1), {
            "loss": loss, "recon": recon, "kl": kl}

    return jax.jit(step, donate_argnums=(0,))
