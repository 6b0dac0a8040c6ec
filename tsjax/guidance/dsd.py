"""Dual score distillation (DSD, ThemeStation eq. 5) as a pure function.

    L_DSD = alpha * VSD(concept prior, colour render, t in T_concept)
          + beta  * [VSD(reference prior, colour render, t in T_ref)
                     + VSD(reference prior, normal render, t in T_ref)]      (normal term optional)

with one shared camera-conditioned LoRA denoiser (the VSD "variational" score of the current renders),
trained inside the same step on the detached colour (and normal) latents. The t-ranges come from the
guidance mode (``tsjax.config.guidance_t_ranges``): DSD uses the concept prior at high noise
``[0.5, 0.75]`` and the reference prior at low noise ``[0.1, 0.25]``; the paper's ablations change them
or drop the reference prior (a range of ``None`` disables a term).

Prompts are view-dependent: every prompt table is ``[V, L, D]`` text embeddings indexed by a per-view
direction id (``tsjax.theme.prompts.DIRECTIONS``: front, side, back, overhead), precomputed on the host,
so the step never tokenises.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp

from tsjax.guidance.vsd import Denoiser, lora_loss, lora_noise, vsd_finish, vsd_noise, vsd_term

__all__ = ["PriorPrompts", "DSDSettings", "dsd_loss"]

Array = jax.Array


@flax.struct.dataclass
class PriorPrompts:
    """A denoiser with its prompt embeddings.

    denoiser: the prior (or the LoRA model). color: ``[V,L,D]`` embeddings of the colour prompt per
    view direction; normal: ``[V,L,D]`` of the ", normal map" prompt (or None); uncond: ``[L,D]`` the
    empty prompt (CFG; unused for the LoRA).
    """

    denoiser: Denoiser
    color: Array
    normal: Array | None = None
    uncond: Array | None = None


@flax.struct.dataclass
class DSDSettings:
    """Static settings (hashable metadata) of :func:`dsd_loss`.

    concept_t / reference_t: (lo, hi) fractions of T or None (term off). alpha, beta: term weights.
    guidance_scale: CFG of the priors. reference_guidance_scale: CFG of the reference prior when it should
      differ (None: ``guidance_scale``; 1: conditional prediction only, no unconditional pass).
    normal_distillation: reference prior also on the normal render.
    camera_dropout: LoRA training camera dropout. lora_weight: weight of the LoRA loss in the total.
    fuse_passes: run the weight-sharing UNet passes batched (see :func:`dsd_loss`): the reference prior
      once on ``[uncond, cond] x [colour, normal]`` (4B rows), the concept prior once (2B rows), the LoRA
      once for all VSD predictions (up to 3B rows, no gradient) and once for its training loss on colour
      and normal (2B rows, with gradient). Same random draws and the same function as the per-term
      path (a perf switch, ``tsjax.config.PerfConfig.fuse_unet_passes``).
    """

    concept_t: tuple[float, float] | None = flax.struct.field(pytree_node=False, default=(0.5, 0.75))
    reference_t: tuple[float, float] | None = flax.struct.field(pytree_node=False, default=(0.1, 0.25))
    alpha: float = flax.struct.field(pytree_node=False, default=0.2)
    beta: float = flax.struct.field(pytree_node=False, default=1.0)
    guidance_scale: float = flax.struct.field(pytree_node=False, default=7.5)
    reference_guidance_scale: float | None = flax.struct.field(pytree_node=False, default=None)
    normal_distillation: bool = flax.struct.field(pytree_node=False, default=True)
    camera_dropout: float = flax.struct.field(pytree_node=False, default=0.1)
    lora_weight: float = flax.struct.field(pytree_node=False, default=1.0)
    fuse_passes: bool = flax.struct.field(pytree_node=False, default=False)

    @property
    def ref_scale(self) -> float:
        """The reference prior's CFG scale (``reference_guidance_scale``, else ``guidance_scale``)."""
        return self.guidance_scale if self.reference_guidance_scale is None else self.reference_guidance_scale


def _rows(table: Array, direction: Array) -> Array:
    return table[direction]


def _cat(xs: list[Array | None]) -> Array | None:
    return None if xs[0] is None else jnp.concatenate(xs, 0)


def _fused(ks: Array, color_latents: Array, normal_latents: Array | None, camera: Array | None, direction: Array,
           concept: PriorPrompts | None, reference: PriorPrompts | None, lora: PriorPrompts, scheduler: Any,
           s: "DSDSettings", use_concept: bool, use_ref: bool, use_normal: bool
           ) -> tuple[dict[str, Array], Array]:
    """Batched-pass DSD (``settings.fuse_passes``): same draws and terms as the per-term path."""
    B = color_latents.shape[0]
    # one entry per VSD term: (metric name, key, latents, prior, prior cond rows, lora cond rows, t-range)
    terms = []
    if use_concept:
        terms.append(("concept", ks[0], color_latents, concept, _rows(concept.color, direction),
                      _rows(lora.color, direction), s.concept_t))
    if use_ref:
        terms.append(("ref_color", ks[1], color_latents, reference, _rows(reference.color, direction),
                      _rows(lora.color, direction), s.reference_t))
        if use_normal:
            terms.append(("ref_normal", ks[2], normal_latents, reference, _rows(reference.normal, direction),
                          _rows(lora.normal, direction), s.reference_t))
    scales = [s.guidance_scale if tm[0] == "concept" else s.ref_scale for tm in terms]
    draws = [vsd_noise(k, z, scheduler, tr) for (_, k, z, _, _, _, tr) in terms]
    # prior passes: one call per prior with [uncond; cond] for each of its terms
    prior_out: list[Array] = [None] * len(terms)  # type: ignore[list-item]
    groups: dict[int, list[int]] = {}
    for i, term in enumerate(terms):
        groups.setdefault(id(term[3]), []).append(i)
    for idx in groups.values():
        prior = terms[idx[0]][3]
        scale = scales[idx[0]]  # one scale per prior (the reference terms share theirs)
        cfg = float(scale) != 1.0
        xs, ts, ctx, cams = [], [], [], []
        for i in idx:
            t, _, x_t = draws[i]
            rows = [terms[i][4]]
            if cfg:
                rows = [jnp.broadcast_to(prior.uncond, (B,) + prior.uncond.shape), terms[i][4]]
            for r in rows:
                xs.append(x_t), ts.append(t), ctx.append(r), cams.append(camera)
        out = prior.denoiser.apply(prior.denoiser.params, _cat(xs), _cat(ts), _cat(ctx), _cat(cams))
        parts = jnp.split(out, len(xs), axis=0)
        for j, i in enumerate(idx):
            if cfg:
                u, c = parts[2 * j], parts[2 * j + 1]
                prior_out[i] = u + scale * (c - u)
            else:
                prior_out[i] = parts[j]
    m: dict[str, Array] = {}
    if terms:  # LoRA predictions of every term in one call, no gradient
        lp = jax.lax.stop_gradient(lora.denoiser.params)
        out_l = lora.denoiser.apply(lp, _cat([d[2] for d in draws]), _cat([d[0] for d in draws]),
                                    _cat([tm[5] for tm in terms]), _cat([camera] * len(terms)))
        for i, (tm, d, ol) in enumerate(zip(terms, draws, jnp.split(out_l, len(terms), axis=0))):
            o = vsd_finish(tm[2], d[0], d[1], d[2], prior_out[i], ol, scheduler=scheduler)
            m["loss_" + tm[0]] = o.loss
            if tm[0] in ("concept", "ref_color"):
                m["t_" + ("concept" if tm[0] == "concept" else "reference")] = jnp.mean(o.t.astype(jnp.float32))
    # LoRA training: colour (+ normal) in one call with gradient
    lat = [(ks[3], color_latents, lora.color)]
    if use_normal and use_ref:
        lat.append((ks[4], normal_latents, lora.normal))
    dr = [lora_noise(k, z, scheduler=scheduler, camera=camera, camera_dropout=s.camera_dropout) for k, z, _ in lat]
    pred = lora.denoiser.apply(lora.denoiser.params, _cat([d[1] for d in dr]), _cat([d[0] for d in dr]),
                               jax.lax.stop_gradient(_cat([_rows(tbl, direction) for _, _, tbl in lat])),
                               _cat([d[3] for d in dr]))
    losses = [jnp.mean(jnp.square(p.astype(jnp.float32) - d[2]))
              for p, d in zip(jnp.split(pred, len(lat), axis=0), dr)]
    l_lora = losses[0] if len(losses) == 1 else 0.5 * (losses[0] + losses[1])
    return m, l_lora


def dsd_loss(key: Array, *, color_latents: Array, normal_latents: Array | None, camera: Array | None,
             direction: Array, concept: PriorPrompts | None, reference: PriorPrompts | None, lora: PriorPrompts,
             scheduler: Any, settings: DSDSettings) -> tuple[Array, dict[str, Array]]:
    """Total DSD + LoRA loss and named terms.

    Args:
      key: PRNG key (one fold per term).
      color_latents: ``[B,h,w,C]`` scaled latents of the colour renders (gradient flows through them).
      normal_latents: ``[B,h,w,C]`` latents of the normal renders, or None.
      camera: ``[B,16]`` flattened c2w of the views (LoRA condition). direction: ``[B]`` int32 view ids.
      concept / reference: priors with prompt tables (None, or a ``None`` t-range, disables the term).
      lora: the shared LoRA denoiser and its colour/normal prompt tables.
      scheduler: shared noise schedule (all models share the latent space and schedule).

    Returns ``(total, metrics)``; metrics hold ``loss_concept``, ``loss_ref_color``, ``loss_ref_normal``,
    ``loss_dsd`` (the weighted distillation part), ``loss_lora``, and the mean timesteps ``t_concept``,
    ``t_reference`` (float32 scalars; 0 for disabled terms).
    """
    s = settings
    zero = jnp.zeros((), jnp.float32)
    ks = jax.random.split(key, 5)
    m = {"loss_concept": zero, "loss_ref_color": zero, "loss_ref_normal": zero, "t_concept": zero,
         "t_reference": zero}
    B = color_latents.shape[0]
    use_normal = s.normal_distillation and normal_latents is not None

    def uncond_of(p: PriorPrompts):
        return jnp.broadcast_to(p.uncond, (B,) + p.uncond.shape)

    use_concept = concept is not None and s.concept_t is not None
    use_ref = reference is not None and s.reference_t is not None
    if use_ref and use_normal and (reference.normal is None or lora.normal is None):
        raise ValueError("normal distillation needs normal-map prompt tables for the reference prior and the LoRA")
    if s.fuse_passes:
        mf, l_lora = _fused(ks, color_latents, normal_latents, camera, direction, concept, reference, lora,
                            scheduler, s, use_concept, use_ref, use_normal)
        m.update(mf)
        l_dsd = s.alpha * m["loss_concept"] + s.beta * (m["loss_ref_color"] + m["loss_ref_normal"])
        m["loss_dsd"], m["loss_lora"] = l_dsd, l_lora
        return l_dsd + s.lora_weight * l_lora, m
    if concept is not None and s.concept_t is not None:
        o = vsd_term(ks[0], color_latents, prior=concept.denoiser, lora=lora.denoiser, scheduler=scheduler,
                     cond=_rows(concept.color, direction), uncond=uncond_of(concept), camera=camera,
                     t_range=s.concept_t, guidance_scale=s.guidance_scale,
                     lora_cond=_rows(lora.color, direction))
        m["loss_concept"], m["t_concept"] = o.loss, jnp.mean(o.t.astype(jnp.float32))
    if reference is not None and s.reference_t is not None:
        o = vsd_term(ks[1], color_latents, prior=reference.denoiser, lora=lora.denoiser, scheduler=scheduler,
                     cond=_rows(reference.color, direction), uncond=uncond_of(reference), camera=camera,
                     t_range=s.reference_t, guidance_scale=s.ref_scale,
                     lora_cond=_rows(lora.color, direction))
        m["loss_ref_color"], m["t_reference"] = o.loss, jnp.mean(o.t.astype(jnp.float32))
        if use_normal:
            if reference.normal is None or lora.normal is None:
                raise ValueError("normal distillation needs normal-map prompt tables for the reference prior "
                                 "and the LoRA")
            o = vsd_term(ks[2], normal_latents, prior=reference.denoiser, lora=lora.denoiser, scheduler=scheduler,
                         cond=_rows(reference.normal, direction), uncond=uncond_of(reference), camera=camera,
                         t_range=s.reference_t, guidance_scale=s.ref_scale,
                         lora_cond=_rows(lora.normal, direction))
            m["loss_ref_normal"] = o.loss
    l_dsd = s.alpha * m["loss_concept"] + s.beta * (m["loss_ref_color"] + m["loss_ref_normal"])
    l_lora = lora_loss(ks[3], color_latents, lora=lora.denoiser, scheduler=scheduler,
                       cond=_rows(lora.color, direction), camera=camera, camera_dropout=s.camera_dropout)
    if use_normal and reference is not None and s.reference_t is not None:
        l_lora = 0.5 * (l_lora + lora_loss(ks[4], normal_latents, lora=lora.denoiser, scheduler=scheduler,
                                           cond=_rows(lora.normal, direction), camera=camera,
                                           camera_dropout=s.camera_dropout))
    m["loss_dsd"], m["loss_lora"] = l_dsd, l_lora
    return l_dsd + s.lora_weight * l_lora, m
