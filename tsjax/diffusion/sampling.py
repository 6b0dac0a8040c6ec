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

import dataclasses
import functools
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.diffusion.schedulers import DDIMScheduler, DDPMScheduler, scheduler_from_config

__all__ = ["img2img_start", "make_sampler", "cfg_combine", "generate", "encode_prompts", "DiffusionModel",
           "load_model", "save_model", "tiny_model", "tiny_tokenizer"]

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


def encode_prompts(model: Any, prompts: Sequence[str], text_params: Any = None) -> jax.Array:
    """Tokenise (pad/truncate to the tokenizer's max length) and run the CLIP text encoder.

    Returns ``last_hidden_state`` ``[len(prompts), L, D]`` float32.
    """
    ids = model.tokenize(list(prompts))
    p = model.params["text_encoder"] if text_params is None else text_params
    return jax.jit(model.encode_text)(p, ids)


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
    cond = encode_prompts(model, prompts, params["text_encoder"])
    uncond = encode_prompts(model, list(negative_prompts) if negative_prompts else [""] * B, params["text_encoder"])
    init_latents = None
    if init_images is not None:
        mean, logvar = jax.jit(model.vae_encode)(params["vae"], init_images * 2.0 - 1.0)
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


# ----------------------------------------------------------------------------------------------
# Model bundle: load a diffusers folder, a tsjax-saved folder or a tiny random model; save back
# ----------------------------------------------------------------------------------------------

TSJAX_MODEL_FILE = "tsjax_model.json"
TSJAX_PARAMS_DIR = "params"  # orbax checkpoint (tsjax.diffusion.io)
TSJAX_PARAMS_FILE = "params.msgpack"  # legacy (flax msgpack), still read by load_model


def tiny_tokenizer(max_length: int = 77):
    """A byte-level CLIP tokenizer needing no downloaded vocabulary (for ``tiny`` random models).

    Vocabulary: the 256 byte symbols of CLIP's byte-to-unicode map, the same with the ``</w>``
    word-end marker, then ``<|startoftext|>`` (512) and ``<|endoftext|>`` (513); no BPE merges, so every
    character is one token. It is a genuine ``transformers.CLIPTokenizer`` and saves/loads as one.
    """
    import json
    import tempfile

    from transformers import CLIPTokenizer
    from transformers.models.clip.tokenization_clip import bytes_to_unicode

    syms = list(bytes_to_unicode().values())
    vocab = syms + [s + "</w>" for s in syms] + ["<|startoftext|>", "<|endoftext|>"]
    with tempfile.TemporaryDirectory() as d:
        with open(f"{d}/vocab.json", "w") as fh:
            json.dump({t: i for i, t in enumerate(vocab)}, fh)
        with open(f"{d}/merges.txt", "w") as fh:
            fh.write("#version: 0.2\n")
        return CLIPTokenizer(f"{d}/vocab.json", f"{d}/merges.txt", model_max_length=max_length)


@dataclasses.dataclass(frozen=True)
class DiffusionModel:
    """A latent text-to-image model: Flax modules, their configs and params, tokenizer, scheduler.

    ``params`` is ``{"unet": ..., "vae": ..., "text_encoder": ...}`` (float32). The methods are pure
    functions of explicit params so they can be used inside ``jit``/``grad``:
    ``unet_apply(p, x [B,h,w,4], t [B], ctx [B,L,D], camera [B,16] | None)``,
    ``encode_text(p, ids [B,L]) -> [B,L,D]``, ``vae_encode(p, x [B,H,W,3] in [-1,1]) -> (mean, logvar)``,
    ``vae_decode(p, z) -> [B,H,W,3]`` in [-1, 1] (``z`` unscaled latents).
    """

    unet_config: Any
    vae_config: Any
    text_config: Any
    scheduler_config: dict
    tokenizer: Any
    params: dict
    source: str = ""

    # modules are rebuilt from the (hashable, frozen) configs
    @functools.cached_property
    def unet(self):
        from tsjax.diffusion.unet import UNet2DConditionModel

        return UNet2DConditionModel(self.unet_config)

    @functools.cached_property
    def vae(self):
        from tsjax.diffusion.vae import AutoencoderKL

        return AutoencoderKL(self.vae_config)

    @functools.cached_property
    def text_encoder(self):
        from tsjax.diffusion.clip_text import CLIPTextModel

        return CLIPTextModel(self.text_config)

    @functools.cached_property
    def scheduler(self) -> DDIMScheduler | DDPMScheduler:
        return scheduler_from_config(self.scheduler_config)

    @property
    def scaling_factor(self) -> float:
        return float(self.vae_config.scaling_factor)

    @property
    def latent_factor(self) -> int:
        return 2 ** (len(self.vae_config.block_out_channels) - 1)

    @property
    def latent_channels(self) -> int:
        return int(self.unet_config.in_channels)

    @property
    def sample_size(self) -> int:
        return int(self.unet_config.sample_size)

    @property
    def max_length(self) -> int:
        return int(min(self.tokenizer.model_max_length, self.text_config.max_position_embeddings))

    def tokenize(self, prompts: Sequence[str]) -> jax.Array:
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="np").input_ids
        return jnp.asarray(ids, jnp.int32)

    def encode_text(self, params, ids):
        return self.text_encoder.apply({"params": params}, ids)[0]

    def unet_apply(self, params, x, t, ctx, camera=None, **kw):
        if camera is not None and getattr(self.unet_config, "camera_embed_dim", None) is None:
            camera = None  # a model without camera embedding ignores the camera condition
        return self.unet.apply({"params": params}, x, t, ctx, camera, **kw)

    def vae_encode(self, params, x):
        return self.vae.apply({"params": params}, x, method=self.vae.encode)

    def vae_decode(self, params, z):
        return self.vae.apply({"params": params}, z, method=self.vae.decode)


def _config_dict(cfg) -> dict:
    d = dataclasses.asdict(cfg)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def _config_from(cls, d: dict):
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kw = {k: tuple(v) if isinstance(v, list) else v for k, v in d.items() if k in fields}
    return cls(**kw)


def save_model(model: DiffusionModel, out_dir: str | os.PathLike, params: dict | None = None) -> Path:
    """Save a model (optionally with other ``params``) as a tsjax folder :func:`load_model` reads.

    Layout: ``tsjax_model.json`` (the three module configs + the scheduler config), ``params/`` (an orbax
    checkpoint of ``{"unet", "vae", "text_encoder"}`` written by :func:`tsjax.diffusion.io.save_params`)
    and ``tokenizer/``. A legacy ``params.msgpack`` left in ``out_dir`` by an older save is removed so the
    folder holds one parameter set.
    """
    import json

    from tsjax.diffusion.io import save_params

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    params = model.params if params is None else params
    meta = {"format": "tsjax-diffusion-v1", "unet": _config_dict(model.unet_config),
            "vae": _config_dict(model.vae_config), "text_encoder": _config_dict(model.text_config),
            "scheduler": dict(model.scheduler_config), "source": model.source}
    (out / TSJAX_MODEL_FILE).write_text(json.dumps(meta, indent=1, default=str))
    missing = [k for k in ("unet", "vae", "text_encoder") if k not in params]
    if missing:
        raise ValueError(f"save_model({out}): params lack {', '.join(missing)}")
    save_params(out / TSJAX_PARAMS_DIR, {k: params[k] for k in ("unet", "vae", "text_encoder")})
    (out / TSJAX_PARAMS_FILE).unlink(missing_ok=True)
    model.tokenizer.save_pretrained(str(out / "tokenizer"))
    return out


TINY_SCHEDULER = {"_class_name": "DDIMScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
                  "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
                  "set_alpha_to_one": False, "steps_offset": 1, "prediction_type": "epsilon"}


def tiny_model(seed: int = 0, *, camera: bool = False) -> DiffusionModel:
    """A small randomly initialised model for CPU runs and tests (``--model tiny`` / ``tiny-camera``).

    Uses ``UNetConfig.tiny()``, ``VAEConfig.tiny()``, ``CLIPTextConfig.tiny()`` of the model modules,
    the byte-level :func:`tiny_tokenizer` and Stable Diffusion's DDIM schedule.
    """
    from tsjax.diffusion.clip_text import CLIPTextConfig
    from tsjax.diffusion.unet import UNetConfig
    from tsjax.diffusion.vae import VAEConfig

    ucfg = UNetConfig.tiny()
    if camera:
        ucfg = dataclasses.replace(ucfg, camera_embed_dim=16)
    tcfg = CLIPTextConfig.tiny()
    vcfg = VAEConfig.tiny()
    tok = tiny_tokenizer(int(tcfg.max_position_embeddings))
    shell = DiffusionModel(ucfg, vcfg, tcfg, dict(TINY_SCHEDULER), tok, {}, source=f"tiny:{seed}")
    ku, kv, kt = jax.random.split(jax.random.key(seed), 3)
    f = shell.latent_factor
    s = ucfg.sample_size
    ids = jnp.zeros((1, shell.max_length), jnp.int32)
    ctx = jnp.zeros((1, shell.max_length, int(ucfg.cross_attention_dim)))
    cam = jnp.zeros((1, 16)) if camera else None
    params = {
        "unet": shell.unet.init(ku, jnp.zeros((1, s, s, ucfg.in_channels)), jnp.zeros((1,), jnp.int32), ctx,
                                cam)["params"],
        "vae": shell.vae.init(kv, jnp.zeros((1, s * f, s * f, 3)))["params"],
        "text_encoder": shell.text_encoder.init(kt, ids)["params"],
    }
    return dataclasses.replace(shell, params=params)


def _param_template(shell: DiffusionModel) -> dict:
    """``{"unet", "vae", "text_encoder"}`` parameter shapes of ``shell``'s configs (``jax.eval_shape``, no
    memory), used to check a saved checkpoint against its ``tsjax_model.json``."""
    ucfg = shell.unet_config
    s, L, f = shell.sample_size, int(shell.text_config.max_position_embeddings), shell.latent_factor
    cdim = getattr(ucfg, "camera_embed_dim", None)
    cam = jnp.zeros((1, int(cdim))) if cdim is not None else None
    key = jax.random.key(0)

    def init(k):
        ku, kv, kt = jax.random.split(k, 3)
        return {
            "unet": shell.unet.init(ku, jnp.zeros((1, s, s, ucfg.in_channels)), jnp.zeros((1,), jnp.int32),
                                    jnp.zeros((1, L, int(ucfg.cross_attention_dim))), cam)["params"],
            "vae": shell.vae.init(kv, jnp.zeros((1, s * f, s * f, 3)))["params"],
            "text_encoder": shell.text_encoder.init(kt, jnp.zeros((1, L), jnp.int32))["params"],
        }

    return jax.eval_shape(init, key)


def load_model(spec: str) -> DiffusionModel:
    """Load ``spec``: ``tiny`` / ``tiny:SEED`` / ``tiny-camera[:SEED]`` (random tiny model), a folder
    written by :func:`save_model` (orbax ``params/``, or a legacy ``params.msgpack``), or a diffusers Stable
    Diffusion folder (``model_index.json`` with ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/``,
    ``scheduler/``). Never touches the network.
    """
    import json

    from flax import serialization

    name, _, seed = spec.partition(":")
    if name in ("tiny", "tiny-camera"):
        if seed and not seed.isdigit():
            raise ValueError(f"--model {spec}: the seed after ':' must be an integer")
        return tiny_model(int(seed or 0), camera=name == "tiny-camera")
    root = Path(spec)
    if not root.is_dir():
        raise FileNotFoundError(f"--model {spec}: no such directory (or use 'tiny')")
    if (root / TSJAX_MODEL_FILE).is_file():
        from tsjax.diffusion.clip_text import CLIPTextConfig, load_tokenizer
        from tsjax.diffusion.unet import UNetConfig
        from tsjax.diffusion.vae import VAEConfig

        from tsjax.diffusion.io import load_params

        meta = json.loads((root / TSJAX_MODEL_FILE).read_text())
        shell = DiffusionModel(_config_from(UNetConfig, meta["unet"]), _config_from(VAEConfig, meta["vae"]),
                               _config_from(CLIPTextConfig, meta["text_encoder"]), meta["scheduler"],
                               load_tokenizer(str(root / "tokenizer")), {}, source=str(root))
        pdir, pfile = root / TSJAX_PARAMS_DIR, root / TSJAX_PARAMS_FILE
        if pdir.exists():
            params = load_params(pdir, target=_param_template(shell))
        elif pfile.is_file():
            params = serialization.msgpack_restore(pfile.read_bytes())
            params = jax.tree_util.tree_map(jnp.asarray, params)
        else:
            raise FileNotFoundError(f"{pdir}: missing parameter checkpoint of the tsjax model folder "
                                    f"(nor a legacy {TSJAX_PARAMS_FILE})")
        return dataclasses.replace(shell, params=params)
    if (root / "model_index.json").is_file():
        from tsjax.diffusion.convert import load_pipeline

        pipe = load_pipeline(str(root))
        return _from_pipeline(pipe, str(root))
    raise FileNotFoundError(f"--model {spec}: neither a diffusers folder (model_index.json) nor a tsjax "
                            f"model folder ({TSJAX_MODEL_FILE})")


def _from_pipeline(pipe: Any, source: str) -> DiffusionModel:
    """Adapt the bundle returned by ``tsjax.diffusion.convert.load_pipeline`` to :class:`DiffusionModel`.

    Reads, per component ``c`` in (unet, vae, text_encoder), the config from ``pipe.{c}_config`` and the
    params from ``pipe.params[c]`` or ``pipe.{c}_params``; plus ``pipe.tokenizer`` and
    ``pipe.scheduler_config``. A bundle lacking one of them is reported by name.
    """
    names = {"unet": "unet", "vae": "vae", "text_encoder": "text_encoder"}
    cfgs, params = {}, {}
    for c in names:
        cfg = getattr(pipe, f"{c}_config", None)
        p = (getattr(pipe, "params", None) or {}).get(c) if isinstance(getattr(pipe, "params", None), dict) else None
        p = p if p is not None else getattr(pipe, f"{c}_params", None)
        if cfg is None or p is None:
            raise ValueError(f"{source}: converted pipeline has no {c} config/params "
                             f"(tsjax.diffusion.convert.load_pipeline returned {type(pipe).__name__})")
        cfgs[c], params[c] = cfg, p
    tok = getattr(pipe, "tokenizer", None)
    sched = getattr(pipe, "scheduler_config", None)
    if tok is None or sched is None:
        raise ValueError(f"{source}: converted pipeline has no tokenizer or scheduler_config")
    return DiffusionModel(cfgs["unet"], cfgs["vae"], cfgs["text_encoder"], dict(sched), tok, params, source=source)
