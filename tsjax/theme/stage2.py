"""Stage 2: reference-informed 3D asset modelling (DMTet optimised with dual score distillation).

One jitted, state-donating function ``step(state, inputs, key) -> (state, metrics)`` does a whole
iteration:

1. cameras: ``B`` orbit cameras sampled in the configured ranges (elevation, azimuth, distance, fovy)
   from ``fold_in(key, state.step)``; their view-direction ids pick the prompt rows (front/side/back/
   overhead); ``K`` of the ``N`` contextual cameras (the init-model views that were img2img-augmented)
   are drawn without replacement.
2. render: the DMTet surface is re-extracted (static-capacity marching tets) and the ``B + K`` views are
   rendered in one call on white (head-light Lambert shading of the sRGB albedo field by default, the
   shading of the exemplar renders). The distilled colour image is re-composited over the background:
   with probability ``random_background_prob`` a random solid colour, else the neural environment colour
   (a small MLP of the world-space ray direction). Normal maps stay on white, the convention the reference
   prior was trained with.
3. loss (a readable sum of named terms)::

       L = DSD(colour, normal latents)                         (tsjax.guidance.dsd; includes LoRA loss)
         + contextual_weight * CX(features(K renders), features(K pseudo-views))
         + tv * TV(albedo) + sdf_sparsity * SDF-sign BCE + opacity(step) * opacity entropy
         + normal_consistency * (1 - cos) over mesh edges

   ``opacity(step)`` ramps linearly from 0 to ``opacity`` over ``opacity_ramp_steps``. The SDF "sparsity"
   term is DMTet's sign-change BCE (``tsjax.geometry.regularizers.sdf_sign_change``), which removes
   spurious surface crossings.
4. update: AdamW per parameter group (geometry encoding / geometry MLP / material / background / LoRA,
   learning rates from the config). A step whose loss or gradients are not finite leaves the state
   unchanged (``metrics["finite"] == 0``), so the caller can stop with the last good state.

All shapes are static; the step compiles once. Arrays in ``inputs`` (tet grid, prior parameters, prompt
tables, contextual targets) are passed as arguments, never baked into the program as constants.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import optax

from tsjax.config import CameraConfig, OptimConfig, PerfConfig, RegularizerConfig
from tsjax.geometry.dmtet import DMTetConfig, albedo, sdf_and_deform
from tsjax.geometry.marching import marching_tets
from tsjax.geometry.regularizers import normal_consistency, opacity_entropy, sdf_sign_change, total_variation
from tsjax.geometry.render import render_trimesh
from tsjax.guidance.dsd import DSDSettings, PriorPrompts, dsd_loss
from tsjax.guidance.vsd import Denoiser, encode_latents
from tsjax.metrics.vgg import contextual_loss
from tsjax.ops import conv as conv_ops
from tsjax.render.camera import Cameras, camera_condition, sample_orbit_cameras
from tsjax.theme.prompts import direction_ids

__all__ = ["Stage2Spec", "Stage2Inputs", "Stage2State", "make_optimizer", "init_background", "background_color",
           "init_state", "make_step", "make_step_fn", "make_grad_fn", "make_sharded_step",
           "split_inputs", "PER_ASSET_FIELDS", "patch_features", "LOSS_TERMS", "resolve_dtype", "compute_module",
           "with_compute", "cast_floating", "prepare_inputs"]

#: Names of the loss terms reported in the metrics (and checked for NaN/inf by the driver).
LOSS_TERMS = ("loss_concept", "loss_ref_color", "loss_ref_normal", "loss_lora", "loss_contextual", "loss_tv",
              "loss_sdf", "loss_opacity", "loss_normal_consistency")


@dataclasses.dataclass(frozen=True)
class Stage2Spec:
    """Static description of the step (hashable; everything here is compile-time).

    dmtet: geometry config; resolution: render side in pixels; batch_size: B distilled views per step;
    context_views: K contextual views per step (0 disables the contextual loss); contextual_weight;
    dsd: DSD settings; reg / camera: regulariser weights and camera ranges;
    vae_encode: ``(vae_params, x [B,H,W,3] in [-1,1]) -> (mean, logvar)``; scaling_factor: latent scale;
    lora_apply: ``({"base": ..., "train": ...}, x_t, t, ctx, camera) -> out`` the LoRA denoiser;
    scheduler: the shared noise schedule; features: ``(feature_params, images [B,H,W,3] in [0,1]) ->
    [B,h,w,C]`` for the contextual loss; shading: "lambert" (head-light, as the exemplar renders the
    priors learnt from) or "unlit" colour renders; backend: rasterizer backend; perf: implementation
    switches (:class:`tsjax.config.PerfConfig`; :data:`tsjax.config.PLAIN_PERF` is the unoptimised
    reference variant).
    """

    dmtet: DMTetConfig
    resolution: int
    batch_size: int
    context_views: int
    contextual_weight: float
    dsd: DSDSettings
    reg: RegularizerConfig
    camera: CameraConfig
    vae_encode: Callable[..., Any]
    scaling_factor: float
    lora_apply: Callable[..., Any]
    scheduler: Any
    features: Callable[..., Any] | None = None
    shading: str = "lambert"
    backend: str = "auto"
    perf: PerfConfig = PerfConfig()


@flax.struct.dataclass
class Stage2Inputs:
    """Per-run constant inputs of the step (a pytree passed as the ``inputs``/"batch" argument).

    grid: the tet grid; vae: VAE params; concept / reference: priors with prompt tables (or None);
    lora_base: frozen parameters the LoRA denoiser reads; lora_color / lora_normal: ``[V,L,D]`` prompt
    tables of the LoRA model; context_feats: ``[N,h,w,C]`` features of the N contextual pseudo-views (or
    None); context_c2w / context_proj: ``[N,4,4]`` their cameras; feature_params: params of ``features``.
    """

    grid: Any
    vae: Any
    concept: PriorPrompts | None
    reference: PriorPrompts | None
    lora_base: Any
    lora_color: jax.Array
    lora_normal: jax.Array | None = None
    context_feats: jax.Array | None = None
    context_c2w: jax.Array | None = None
    context_proj: jax.Array | None = None
    feature_params: Any = None


@flax.struct.dataclass
class Stage2State:
    """``params = {"geo": DMTet params, "bg": background MLP, "lora": trainable LoRA params}``,
    ``opt_state`` (optax multi-transform state), ``step`` int32 scalar."""

    params: dict
    opt_state: Any
    step: jax.Array


# ---------------------------------------------------------------------------------------------
# parameters and optimiser
# ---------------------------------------------------------------------------------------------

_GEO_GROUPS = {"sdf_enc": "geometry_encoding", "sdf_mlp": "geometry_mlp", "mat_enc": "material",
               "mat_mlp": "material"}


def _labels(params: dict) -> dict:
    out = {"geo": {k: jax.tree_util.tree_map(lambda _, g=_GEO_GROUPS[k]: g, v) for k, v in params["geo"].items()},
           "bg": jax.tree_util.tree_map(lambda _: "background", params["bg"]),
           "lora": jax.tree_util.tree_map(lambda _: "lora", params["lora"])}
    return out


def make_optimizer(optim: OptimConfig, lora_lr: float) -> optax.GradientTransformation:
    """AdamW (betas, eps, weight decay from ``optim``) with one learning rate per parameter group."""

    def adamw(lr):
        return optax.adamw(lr, b1=optim.b1, b2=optim.b2, eps=optim.eps, weight_decay=optim.weight_decay)

    return optax.multi_transform(
        {"geometry_encoding": adamw(optim.lr_geometry_encoding), "geometry_mlp": adamw(optim.lr_geometry_mlp),
         "material": adamw(optim.lr_material), "background": adamw(optim.lr_background),
         "lora": adamw(lora_lr)}, _labels)


def init_background(key, hidden: int = 16) -> dict:
    """Neural environment colour: ray direction [3] -> hidden (ReLU) -> sRGB (sigmoid)."""
    k1, k2 = jax.random.split(key)
    return {"w1": jax.random.normal(k1, (3, hidden)) * (2.0 / 3.0) ** 0.5, "b1": jnp.zeros((hidden,)),
            "w2": jax.random.normal(k2, (hidden, 3)) * (1.0 / hidden) ** 0.5, "b2": jnp.zeros((3,))}


def _ray_dirs(cams: Cameras, resolution: int) -> jax.Array:
    """World-space unit view directions [B,H,W,3] of every pixel centre (perspective cameras)."""
    n = resolution
    c = (2.0 * jnp.arange(n, dtype=jnp.float32) + 1.0) / n - 1.0
    x = c[None, :]  # columns: NDC x
    y = -c[:, None]  # rows: NDC y (row 0 = top)
    px = x / cams.proj[:, 0, 0][:, None, None]
    py = y / cams.proj[:, 1, 1][:, None, None]
    d = jnp.stack([jnp.broadcast_to(px, (cams.c2w.shape[0], n, n)), jnp.broadcast_to(py, (cams.c2w.shape[0], n, n)),
                   -jnp.ones((cams.c2w.shape[0], n, n))], -1)
    d = jnp.einsum("bij,bhwj->bhwi", cams.c2w[:, :3, :3], d)
    return d * jax.lax.rsqrt(jnp.sum(d * d, -1, keepdims=True))


def background_color(bg: dict, cams: Cameras, resolution: int) -> jax.Array:
    """Neural environment colour [B,H,W,3] (sRGB in [0,1]) seen by ``cams``."""
    d = _ray_dirs(cams, resolution)
    h = jax.nn.relu(d @ bg["w1"] + bg["b1"])
    return jax.nn.sigmoid(h @ bg["w2"] + bg["b2"])


def init_state(geo: dict, bg: dict, lora: Any, optimizer: optax.GradientTransformation) -> Stage2State:
    """Fresh state (float32 copies of the params, optimiser state, step 0; the step donates it, so the
    caller's arrays, e.g. a LoRA's base-model leaves, are never aliased)."""
    params = jax.tree_util.tree_map(lambda x: jnp.array(x, jnp.float32, copy=True), {"geo": geo, "bg": bg, "lora": lora})
    return Stage2State(params=params, opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))


def patch_features(_params: Any, images: jax.Array, *, patch: int = 5, stride: int = 2,
                   max_side: int = 64) -> jax.Array:
    """Weight-free contextual features: ``patch x patch`` RGB patches at ``stride`` -> [B,h,w,3*patch^2].

    Used for the contextual loss when no VGG19 file is given (``--vgg``): contextual similarity of raw
    colour patches compares local colour/texture statistics without any learned network. The contextual
    loss compares every feature position with every other one (an ``(h*w)^2`` matrix per view), so images
    larger than ``stride * max_side`` pixels are first box-filtered down by an integer factor until the
    feature map is at most ``max_side`` positions a side: 512 px renders give 64x64 positions (a 64 MiB
    similarity matrix per view instead of 16 GiB); the tiny preset's 64 px renders are used as they are.
    """
    B, H, W, C = images.shape
    f = max(1, -(-max(H, W) // (stride * max_side)))
    if f > 1:
        h, w = H // f, W // f
        images = images[:, : h * f, : w * f].reshape(B, h, f, w, f, C).mean(axis=(2, 4))
    x = jnp.transpose(images, (0, 3, 1, 2))
    p = jax.lax.conv_general_dilated_patches(x, (patch, patch), (stride, stride), "SAME")
    return jnp.transpose(p, (0, 2, 3, 1))


# ---------------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------------


def resolve_dtype(perf: PerfConfig):
    """The compute dtype ``perf`` asks for (``"auto"``: bfloat16 on GPU/TPU, float32 on CPU; see
    ``PerfConfig.compute_dtype``)."""
    name = perf.compute_dtype
    if name == "auto":
        name = "bfloat16" if jax.default_backend() in ("gpu", "cuda", "rocm", "tpu") else "float32"
    return jnp.dtype(name)


def compute_module(module: Any, perf: PerfConfig) -> Any:
    """``module`` (a flax module with ``dtype`` / ``attention_impl`` attributes, e.g. the UNet or the
    VAE) cloned with the compute dtype and attention implementation of ``perf``; attributes the module
    does not have are left alone. Parameters are unaffected (float32 in, cast at use)."""
    names = {f.name for f in dataclasses.fields(module)}
    upd = {}
    if "dtype" in names:
        upd["dtype"] = resolve_dtype(perf)
    if "attention_impl" in names:
        upd["attention_impl"] = perf.attention_impl
    return module.clone(**upd) if upd else module


def with_compute(model: Any, perf: PerfConfig) -> Any:
    """A copy of a :class:`tsjax.diffusion.sampling.DiffusionModel` whose ``unet``/``vae`` modules compute
    in ``perf``'s dtype with ``perf``'s attention implementation (``unet_apply``/``vae_encode`` of the copy
    use them). Same parameters, same configs."""
    fast = dataclasses.replace(model)
    for name in ("unet", "vae"):
        # DiffusionModel builds its modules lazily (functools.cached_property stores them in __dict__);
        # duck-typed bundles without flax modules under these names are returned unchanged.
        module = getattr(model, name, None)
        if isinstance(module, nn.Module) and dataclasses.is_dataclass(module):
            fast.__dict__[name] = compute_module(module, perf)
    return fast


def cast_floating(tree: Any, dtype) -> Any:
    """Every floating-point leaf of ``tree`` cast to ``dtype`` (integer leaves unchanged)."""
    return jax.tree_util.tree_map(
        lambda x: x.astype(dtype) if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating) else x, tree)


def prepare_inputs(inputs: Stage2Inputs, perf: PerfConfig) -> Stage2Inputs:
    """Store the frozen network weights (VAE, concept/reference priors, LoRA base) in ``perf``'s compute
    dtype (halves their memory and bandwidth in bf16). Trainable parameters live in the state and stay
    float32 masters; prompt tables, the tet grid and contextual targets stay float32."""
    dt = resolve_dtype(perf)
    if dt == jnp.float32:
        return inputs

    def prior(pp):
        return None if pp is None else pp.replace(denoiser=pp.denoiser.replace(
            params=cast_floating(pp.denoiser.params, dt)))

    return inputs.replace(vae=cast_floating(inputs.vae, dt), concept=prior(inputs.concept),
                          reference=prior(inputs.reference), lora_base=cast_floating(inputs.lora_base, dt))


def _remat(fn: Callable, policy: str) -> Callable:
    if policy == "none":
        return fn
    if policy == "dots":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)
    if policy == "full":
        return jax.checkpoint(fn, policy=jax.checkpoint_policies.nothing_saveable)
    raise ValueError(f"perf.remat {policy!r} is not one of none, dots, full")


def _build(spec: Stage2Spec):
    """The loss function ``loss_fn(train, step, inputs, key, part)`` and ``update(optimizer, state, grads,
    metrics)`` shared by :func:`make_step` and :func:`make_grad_fn`."""
    B, K, R = spec.batch_size, spec.context_views, spec.resolution
    cam = spec.camera
    reg = spec.reg
    dm = spec.dmtet
    perf = spec.perf
    dsd_settings = spec.dsd.replace(fuse_passes=perf.fuse_unet_passes)
    vae_encode = _remat(spec.vae_encode, perf.remat)
    lora_apply = _remat(spec.lora_apply, perf.remat)

    def extract_surface(geo, grid, step):
        sdf, deform = sdf_and_deform(geo, grid.verts, dm, step)
        return sdf, marching_tets(grid.verts + deform, sdf, grid, max_faces=dm.max_faces, max_verts=dm.max_verts)

    def render(geo, mesh, cams):
        return render_trimesh(mesh, lambda p: albedo(geo, p, dm), cams, R, background=(1.0, 1.0, 1.0),
                              shading=spec.shading, backend=spec.backend)

    def loss_fn(train: dict, step: jax.Array, inputs: Stage2Inputs, key: jax.Array, part: str = "all"):
        """part: "all" (the whole loss), "main" (all but the contextual term), "ctx" (contextual only)."""
        k_cam, k_bg, k_col, k_ctx, k_dsd = jax.random.split(key, 5)
        cams, cp = sample_orbit_cameras(k_cam, B, elevation=cam.elevation, azimuth=cam.azimuth,
                                        distance=cam.distance, fovy=cam.fovy)
        direction = direction_ids(cp["elevation"], cp["azimuth"])
        ctx_cams = idx = None
        if K > 0:
            n_ctx = inputs.context_c2w.shape[0]
            idx = jax.random.choice(k_ctx, n_ctx, (K,), replace=False)
            ctx_cams = Cameras(inputs.context_c2w[idx], inputs.context_proj[idx])
        geo = train["geo"]
        grid = inputs.grid
        zero = jnp.zeros((), jnp.float32)
        m: dict = {}
        total = zero
        ctx_out = None
        if part in ("all", "main"):
            sdf, mesh = extract_surface(geo, grid, step)
            if part == "all" and K > 0 and perf.single_extraction:
                # one extraction, one render call for the B distilled + K contextual views
                both = Cameras(jnp.concatenate([cams.c2w, ctx_cams.c2w], 0),
                               jnp.concatenate([cams.proj, ctx_cams.proj], 0))
                out_all = render(geo, mesh, both)
                out = {k: v[:B] for k, v in out_all.items()}
                ctx_out = {k: v[B:] for k, v in out_all.items()}
            else:
                out = render(geo, mesh, cams)
            color_w, normal_w, mask = out["color"], out["normal"], out["mask"]
            env = background_color(train["bg"], cams, R)
            solid = jax.random.uniform(k_col, (B, 1, 1, 3))
            use_solid = jax.random.bernoulli(k_bg, cam.random_background_prob, (B, 1, 1, 1))
            bg = jnp.where(use_solid, solid, env)
            color = color_w + (1.0 - mask) * (bg - 1.0)  # exact re-compositing of the white-background render

            z_c = encode_latents(vae_encode, inputs.vae, color, spec.scaling_factor)
            need_normal = spec.dsd.normal_distillation and inputs.reference is not None and spec.dsd.reference_t
            z_n = encode_latents(vae_encode, inputs.vae, normal_w, spec.scaling_factor) if need_normal else None
            lora = PriorPrompts(Denoiser(lora_apply, {"base": inputs.lora_base, "train": train["lora"]}),
                                inputs.lora_color, inputs.lora_normal)
            total, m = dsd_loss(k_dsd, color_latents=z_c, normal_latents=z_n, camera=camera_condition(cams),
                                direction=direction, concept=inputs.concept, reference=inputs.reference, lora=lora,
                                scheduler=spec.scheduler, settings=dsd_settings)
            l_tv = total_variation(out["albedo"])
            l_sdf = sdf_sign_change(sdf, grid.edges)
            l_op = opacity_entropy(mask)
            l_nc = normal_consistency(mesh)
            w_op = reg.opacity * jnp.minimum(step.astype(jnp.float32) / max(reg.opacity_ramp_steps, 1), 1.0)
            total = total + reg.tv * l_tv + reg.sdf_sparsity * l_sdf + w_op * l_op + reg.normal_consistency * l_nc
            m.update(loss_tv=l_tv, loss_sdf=l_sdf, loss_opacity=l_op, loss_normal_consistency=l_nc,
                     num_faces=mesh.num_faces.astype(jnp.float32), overflow=mesh.overflow.astype(jnp.float32),
                     mask_mean=jnp.mean(mask))
        l_cx = zero
        if K > 0 and part in ("all", "ctx"):
            if ctx_out is None:  # a second extraction (plain variant, or the separate contextual jit)
                _, mesh2 = extract_surface(geo, grid, step)
                ctx_out = render(geo, mesh2, ctx_cams)
            f = spec.features(inputs.feature_params, ctx_out["color"])
            l_cx = jnp.mean(contextual_loss(f, inputs.context_feats[idx]))
            total = total + spec.contextual_weight * l_cx
        m["loss_contextual"] = l_cx
        m["loss"] = total
        return total, m

    def update(optimizer, state: Stage2State, grads: dict, m: dict):
        gnorm = optax.tree.norm(grads)
        finite = jnp.isfinite(m["loss"]) & jnp.isfinite(gnorm)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        new = Stage2State(params=params, opt_state=opt_state, step=state.step + 1)
        new = jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, state)
        m = dict(m, grad_norm=gnorm, finite=finite.astype(jnp.float32))
        return new, m

    def loss_with_algorithm(*args, **kwargs):
        # perf.conv_algorithm holds for every conv traced in the loss and its gradient (tsjax.ops.conv).
        with conv_ops.algorithm(perf.conv_algorithm):
            return loss_fn(*args, **kwargs)

    return loss_with_algorithm, update


def _grads_jit(loss_fn: Callable, part: str) -> Callable:
    """``jit((params, step, inputs, key) -> (grads, metrics))`` of loss part ``part`` ("all" | "main" | "ctx")."""
    def g(params, step, inputs, key):
        k = jax.random.fold_in(key, step)
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, step, inputs, k, part)
        return grads, m
    return jax.jit(g)


def combine_split(g_main: dict, m_main: dict, g_ctx: dict, m_ctx: dict) -> tuple[dict, dict]:
    """The un-fused step's gradient and metrics: the main and contextual parts summed."""
    return (jax.tree_util.tree_map(jnp.add, g_main, g_ctx),
            dict(m_main, loss_contextual=m_ctx["loss_contextual"], loss=m_main["loss"] + m_ctx["loss"]))


def make_split_parts(spec: Stage2Spec, optimizer: optax.GradientTransformation
                     ) -> tuple[Callable, Callable, Callable]:
    """The three jitted programs of the un-fused step (``perf.fuse_contextual=False``): ``(grad_main,
    grad_ctx, update)``; ``grad_*(params, step, inputs, key) -> (grads, metrics)``, combined with
    :func:`combine_split`, then ``update(state, grads, metrics) -> (state, metrics)`` (``state`` donated
    when ``perf.donate``). :func:`make_step` composes them; benchmarks compile them one by one."""
    loss_fn, update0 = _build(spec)
    upd = jax.jit(lambda state, grads, m: update0(optimizer, state, grads, m),
                  donate_argnums=(0,) if spec.perf.donate else ())
    return _grads_jit(loss_fn, "main"), _grads_jit(loss_fn, "ctx"), upd


def make_grad_fn(spec: Stage2Spec) -> Callable[[dict, jax.Array, Stage2Inputs, jax.Array], tuple[dict, dict]]:
    """``grads_fn(params, step, inputs, key) -> (grads, metrics)``: the gradient the step applies (same
    key derivation, same ``spec.perf`` implementation: one jit, or main + contextual jits summed). For
    parity tests and benchmarks of the loss/gradient part alone."""
    loss_fn, _ = _build(spec)
    if spec.perf.fuse_contextual or spec.context_views == 0:
        return _grads_jit(loss_fn, "all")
    gm, gc = _grads_jit(loss_fn, "main"), _grads_jit(loss_fn, "ctx")

    def split(params, step, inputs, key):
        return combine_split(*gm(params, step, inputs, key), *gc(params, step, inputs, key))

    return split


def make_step_fn(spec: Stage2Spec, optimizer: optax.GradientTransformation
                 ) -> Callable[[Stage2State, Stage2Inputs, jax.Array], tuple[Stage2State, dict]]:
    """The pure (un-jitted) fused step ``(state, inputs, key) -> (state, metrics)``; :func:`make_step` jits it,
    :func:`make_sharded_step` vmaps it over assets."""
    loss_fn, update = _build(spec)

    def step_fn(state: Stage2State, inputs: Stage2Inputs, key: jax.Array):
        k = jax.random.fold_in(key, state.step)
        (_, m), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params, state.step, inputs, k)
        return update(optimizer, state, grads, m)

    return step_fn


#: Stage2Inputs fields that differ between assets (each asset has its own fine-tuned concept prior and
#: its own img2img-augmented contextual views); all other fields are shared and replicated.
PER_ASSET_FIELDS = ("concept", "context_feats", "context_c2w", "context_proj")


def split_inputs(inputs: Stage2Inputs) -> tuple[dict, Stage2Inputs]:
    """``(per_asset, shared)``: the :data:`PER_ASSET_FIELDS` of ``inputs`` as a dict, and ``inputs`` with
    those fields set to None."""
    per = {f: getattr(inputs, f) for f in PER_ASSET_FIELDS}
    return per, inputs.replace(**{f: None for f in PER_ASSET_FIELDS})


def make_sharded_step(spec: Stage2Spec, optimizer: optax.GradientTransformation, mesh: Any
                      ) -> Callable[[Stage2State, dict, jax.Array, Stage2Inputs], tuple[Stage2State, dict]]:
    """K assets' stage-2 steps as ONE jitted SPMD program over ``mesh`` (``tsjax.parallel.make_mesh``).

    Returns ``multi(states, per_asset, keys, shared) -> (states, metrics)``: ``states`` (a
    :class:`Stage2State` with a leading asset axis K), ``per_asset`` (:func:`split_inputs`'s dict, leaves
    stacked over K: the concept priors and contextual views) and ``keys`` ``[K]`` are split over the
    ``asset`` mesh axis (``tsjax.parallel.shard_assets``); ``shared`` (the rest of :class:`Stage2Inputs`:
    reference prior, VAE, LoRA base, prompt tables, tet grid) is replicated (``tsjax.parallel.replicate``).
    Asset ``k`` computes exactly the single-asset step with ``keys[k]``; metrics have a leading K axis.
    The fused step is used (``perf.fuse_contextual`` is implied); ``perf.donate`` donates ``states``.
    """
    from tsjax.parallel import sharded_asset_step

    raw = make_step_fn(spec, optimizer)

    def one(state, per_asset, key, shared):
        return raw(state, shared.replace(**per_asset), key)

    return sharded_asset_step(one, mesh, num_shared=1, donate_state=spec.perf.donate)


def make_step(spec: Stage2Spec, optimizer: optax.GradientTransformation
              ) -> Callable[[Stage2State, Stage2Inputs, jax.Array], tuple[Stage2State, dict]]:
    """Build the stage-2 step ``step(state, inputs, key) -> (state, metrics)`` (see the module docstring).

    ``spec.perf`` selects the implementation, never the function computed (up to float round-off and,
    for bf16, the bf16 precision of the networks): with ``fuse_contextual`` (default) the result is ONE
    jitted function (``state`` donated when ``perf.donate``); otherwise the contextual gradient is a second
    jitted function and the optimiser update a third. ``perf.compute_dtype`` is realised by the network
    callables in the spec/inputs (:func:`with_compute`, :func:`prepare_inputs`), not here.
    """
    perf, K = spec.perf, spec.context_views
    if perf.fuse_contextual or K == 0:
        return jax.jit(make_step_fn(spec, optimizer), donate_argnums=(0,) if perf.donate else ())
    gm, gc, upd = make_split_parts(spec, optimizer)

    def split_step(state: Stage2State, inputs: Stage2Inputs, key: jax.Array):
        args = (state.params, state.step, inputs, key)
        return upd(state, *combine_split(*gm(*args), *gc(*args)))

    return split_step
