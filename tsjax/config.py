"""Typed, frozen configuration of the ThemeStation pipeline (``python -m tsjax.optimize``).

A :class:`Config` is a tree of frozen ``kw_only`` dataclasses, one section per stage or concern.
Presets are plain Python files exposing ``get_config() -> Config`` (``configs/tiny.py``, the CPU
default; ``configs/paper.py``, the paper's numbers). Command-line overrides use dotted keys::

    cfg = apply_overrides(cfg, ["guidance.alpha=0.3", "camera.fovy=70,80", "steps=200"])

Values are coerced to the field's declared type (``bool`` accepts true/false/1/0/yes/no, tuples are
comma separated, ``None`` is accepted for optional fields); unknown keys raise a ``ValueError`` that
lists the valid ones. Numbers default to the method notes (docs in each section).

Units: angles in degrees, distances in the unit-cube world (the normalised exemplars span 1.0),
learning rates per step, ``t`` ranges as fractions of the diffusion model's ``num_train_timesteps``.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import types
import typing
from pathlib import Path
from typing import Any

__all__ = [
    "DataConfig", "PriorTrainConfig", "ThemePriorConfig", "ConceptPriorConfig", "ReferencePriorConfig",
    "InitConfig", "GuidanceConfig", "GeometryConfig", "OptimConfig", "RegularizerConfig", "CameraConfig",
    "RenderConfig", "PerfConfig", "PLAIN_PERF", "Config", "GUIDANCE_MODES", "guidance_t_ranges", "apply_overrides", "flat_keys",
    "load_config", "to_dict",
]

_frozen = dataclasses.dataclass(frozen=True, kw_only=True)

#: Stage-2 guidance modes = the paper's ablations (Table 3): (a) concept_only, (b) naive, (c) dsd (full
#: model), (d) reverse, (e) ref_dominated. See :func:`guidance_t_ranges`.
GUIDANCE_MODES = ("concept_only", "naive", "dsd", "reverse", "ref_dominated")


@_frozen
class DataConfig:
    """Exemplars and prompts.

    exemplars: a directory of GLB/glTF/OBJ meshes or ``builtin:<theme>`` (procedural, deterministic).
    class_name: the object class in the prompts ("a 3D model of <class>, in the style of <token>").
    token: the rare identifier token [V] bound to the theme (and, in the concept prior, to the concept).
    """

    exemplars: str = "builtin:toy-houses"
    class_name: str = "house"
    token: str = "sks"
    background: tuple[float, float, float] = (1.0, 1.0, 1.0)


@_frozen
class PriorTrainConfig:
    """How one image prior is obtained by fine-tuning.

    model: ``"tiny"`` = a small randomly initialised latent-diffusion model trained from scratch on the
      renders (CPU preset), ``"weights"`` = the Stable Diffusion folder given by ``--weights`` (full
      DreamBooth fine-tune of the UNet), or a path to a diffusers / tsjax model folder.
    steps: optimisation steps; lr: AdamW learning rate; batch_size: images per step.
    resolution: image side in pixels the prior is trained at (the model's native size when 0).
    vae_steps: autoencoder steps before the UNet when training a tiny model from scratch.
    camera: condition on the camera (flattened c2w, dropped with probability ``camera_dropout``).
    prompt_dropout: probability of training a sample on the empty prompt instead of its own. Classifier-free
      guidance (every sampler and VSD term here) mixes the empty-prompt prediction in; a pretrained Stable
      Diffusion already has that unconditional model (DreamBooth fine-tunes keep 0, as the official code),
      but a prior trained from scratch never sees the empty prompt unless it is dropped in (tiny: 0.1).
    """

    model: str = "tiny"
    steps: int = 200
    lr: float = 2e-6
    batch_size: int = 8
    resolution: int = 512
    vae_steps: int = 0
    camera: bool = True
    camera_dropout: float = 0.1
    prompt_dropout: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.prompt_dropout < 1.0:
            raise ValueError(f"prompt_dropout={self.prompt_dropout} must be in [0, 1)")


@_frozen
class ThemePriorConfig:
    """Stage 1: theme prior fine-tuned on exemplar renders, then concept-image sampling.

    n_views: renders per exemplar (paper 20: elevation 0/20 deg, random azimuth).
    steps_single / steps_group: fine-tune steps for one exemplar / several (paper 200 / 400).
    n_concepts: concept images sampled; the one used is ranked (lowest denoising loss under the theme
      prior, or CLIP when available) or chosen with ``--concept``.
    concept_elevation / concept_azimuth: viewpoint of the concept image (camera condition).
    camera_distance / camera_fovy: perspective of the exemplar renders and the concept view, chosen at
      the centre of the stage-2 camera ranges so the priors see objects at the framing they distil.
    """

    train: PriorTrainConfig = PriorTrainConfig()
    n_views: int = 20
    steps_single: int = 200
    steps_group: int = 400
    camera_distance: float = 1.6
    camera_fovy: float = 75.0
    n_concepts: int = 4
    sample_steps: int = 50
    guidance_scale: float = 7.5
    concept_elevation: float = 20.0
    concept_azimuth: float = 30.0


@_frozen
class ConceptPriorConfig:
    """Concept prior: DreamBooth on the concept image + init-model views, img2img-augmented.

    steps_before_aug: steps on the concept image + ``n_init_views`` raw init renders (paper 150);
    steps: total steps, continued on the augmented views (paper 300).
    img2img_strength: strength of the augmentation of the init renders (0.5).
    """

    train: PriorTrainConfig = PriorTrainConfig(steps=300)
    steps_before_aug: int = 150
    n_init_views: int = 20
    img2img_strength: float = 0.5
    img2img_steps: int = 50
    guidance_scale: float = 7.5


@_frozen
class ReferencePriorConfig:
    """Reference prior: fine-tuned on colour and normal exemplar renders (", normal map" suffix)."""

    train: PriorTrainConfig = PriorTrainConfig(steps=150)
    n_color: int = 30
    n_normal: int = 30
    normal_suffix: str = ", normal map"
    camera_mode: str = "ortho"


@_frozen
class InitConfig:
    """Initial 3D model when ``--init MESH`` is not given.

    method: ``"nearest_exemplar"`` = the exemplar whose silhouette from the concept viewpoint has the
      highest IoU with the concept image's foreground mask (documented in tsjax.theme.init).
    sdf_fit_steps: steps fitting the DMTet SDF to the init mesh's signed distance before stage 2.
    sdf_fit_points: points sampled per fit step.
    """

    method: str = "nearest_exemplar"
    sdf_fit_steps: int = 300
    sdf_fit_points: int = 4096
    albedo_fit_steps: int = 200


@_frozen
class GuidanceConfig:
    """Stage-2 score distillation.

    mode: one of :data:`GUIDANCE_MODES` (the paper's ablations); the t-ranges it implies come from
      :func:`guidance_t_ranges` using ``high_t``, ``low_t`` and ``full_t`` (fractions of T).
    alpha / beta: weights of the concept / reference VSD terms (0.2 / 1.0).
    guidance_scale: CFG scale of the prior predictions (7.5).
    reference_guidance_scale: CFG scale of the reference prior when it should differ (None: the same
      ``guidance_scale``; 1.0: no CFG, the conditional prediction only).
    normal_distillation: also distil the normal render with the reference prior.
    lora_rank / lora_lr / camera_dropout: the VSD LoRA (rank 4, lr 1e-4, camera dropped 10%).
    contextual / contextual_weight / contextual_views: contextual loss against the img2img views.
    view_prompts: view-dependent prompt suffixes (", front view", ...) in stage 2, as the official code does
      with Stable Diffusion, which knows those words. Priors trained from scratch on one prompt (tiny) never
      saw them, so their stage-2 prompts are the training prompts (the camera condition carries the view).
    """

    mode: str = "dsd"
    alpha: float = 0.2
    beta: float = 1.0
    high_t: tuple[float, float] = (0.5, 0.75)
    low_t: tuple[float, float] = (0.1, 0.25)
    full_t: tuple[float, float] = (0.02, 0.98)
    guidance_scale: float = 7.5
    reference_guidance_scale: float | None = None
    normal_distillation: bool = True
    lora_rank: int = 4
    lora_lr: float = 1e-4
    camera_dropout: float = 0.1
    contextual: bool = True
    contextual_weight: float = 100.0
    contextual_views: int = 4
    view_prompts: bool = True

    def __post_init__(self):
        if self.mode not in GUIDANCE_MODES:
            raise ValueError(f"guidance.mode {self.mode!r} is not one of {', '.join(GUIDANCE_MODES)}")
        for name in ("high_t", "low_t", "full_t"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise ValueError(f"guidance.{name}={getattr(self, name)} must satisfy 0 <= lo <= hi <= 1")


def guidance_t_ranges(g: GuidanceConfig) -> dict[str, tuple[float, float] | None]:
    """Noise-level ranges (fractions of T) of each prior for the guidance mode; ``None`` = prior unused.

    (a) concept_only: concept at all levels, no reference; (b) naive: both at all levels;
    (c) dsd: concept high, reference low; (d) reverse: concept low, reference high;
    (e) ref_dominated: concept high, reference at all levels.
    """
    table = {
        "concept_only": (g.full_t, None),
        "naive": (g.full_t, g.full_t),
        "dsd": (g.high_t, g.low_t),
        "reverse": (g.low_t, g.high_t),
        "ref_dominated": (g.high_t, g.full_t),
    }
    concept, ref = table[g.mode]
    return {"concept": concept, "reference": ref}


@_frozen
class GeometryConfig:
    """DMTet geometry and material fields (method notes: hash grid 10 levels x 2 features, 2^19 table,
    base resolution 32, per-level scale 1.3195; SDF MLP 64 x 1; material MLP 64 x 2; grid 192).

    grid_resolution: tetrahedral grid resolution (cells per side) over [-scale/2, scale/2]^3.
    grid_scale: side of the grid cube; 1.1 leaves a margin around the unit cube the exemplars and init
        models are normalised into, so surfaces touching the unit cube are not cut open at the grid faces.
    max_faces / max_verts: static capacities of the extracted mesh (0 = derived from the grid).
    progressive_update_steps: steps between enabling successive SDF hash-grid levels (coarse-to-fine).
    """

    grid_resolution: int = 192
    grid_scale: float = 1.1
    n_levels: int = 10
    n_features_per_level: int = 2
    log2_hashmap_size: int = 19
    base_resolution: int = 32
    per_level_scale: float = 1.3195
    sdf_hidden: int = 64
    sdf_layers: int = 1
    material_hidden: int = 64
    material_layers: int = 2
    max_faces: int = 0
    max_verts: int = 0
    progressive_update_steps: int = 500


@_frozen
class OptimConfig:
    """AdamW (betas (0.9, 0.99), eps 1e-15) with one learning rate per parameter group."""

    b1: float = 0.9
    b2: float = 0.99
    eps: float = 1e-15
    weight_decay: float = 0.0
    lr_geometry_encoding: float = 1e-4
    lr_geometry_mlp: float = 2e-5
    lr_material: float = 2e-5
    lr_background: float = 1e-4


@_frozen
class RegularizerConfig:
    """Stage-2 regulariser weights (method notes, official code)."""

    tv: float = 8e-4
    sdf_sparsity: float = 10.0
    opacity: float = 1000.0
    opacity_ramp_steps: int = 2500
    normal_consistency: float = 400.0


@_frozen
class CameraConfig:
    """Stage-2 training camera ranges (degrees / world units) and background randomisation."""

    elevation: tuple[float, float] = (-5.0, 30.0)
    azimuth: tuple[float, float] = (-180.0, 180.0)
    distance: tuple[float, float] = (1.4, 1.8)
    fovy: tuple[float, float] = (70.0, 80.0)
    random_background_prob: float = 0.5


@_frozen
class RenderConfig:
    """Stage-2 render resolution (pixels) and views per step; output turntable settings."""

    resolution: int = 512
    batch_size: int = 1
    turntable_views: int = 24
    turntable_resolution: int = 256
    texture_size: int = 1024


#: Valid values of :class:`PerfConfig` fields.
COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
REMAT_POLICIES = ("none", "dots", "full")
CONV_ALGORITHMS = ("direct", "winograd2", "winograd4")  # also tsjax.ops.conv.ALGORITHMS


@_frozen
class PerfConfig:
    """Stage-2 speed switches (each one measurable on its own with ``bench/dsd_step.py``).

    compute_dtype: compute dtype of the frozen priors, the VAE and the LoRA UNet: ``"float32"``,
      ``"bfloat16"`` (frozen weights stored in bf16, trainable LoRA/geometry weights stay float32
      masters, losses and optimiser in float32) or ``"auto"`` (bf16 on GPU/TPU, float32 on CPU, so that
      the CPU presets give the same results on every CPU). On a CPU with AMX-BF16, ``"bfloat16"`` runs
      the convolutions on AMX tiles and the dense layers as bf16 x bf16 -> f32 dots (``tsjax.ops.conv``,
      ``tsjax.diffusion.layers.dense``): the mid-shape guidance 1.6-1.7x faster than float32
      (bench/README.md); without AMX, XLA:CPU's bf16 kernels are no faster than float32.
    fuse_unet_passes: run weight-sharing UNet passes batched (reference prior: cond/uncond x
      colour/normal in one call; concept prior once; LoRA inference once; LoRA training once).
    attention_impl: ``"auto"`` (cuDNN fused attention on GPU for bf16, tsjax's native flash attention on
      CPU, XLA otherwise), ``"xla"``, ``"cudnn"``, ``"einsum"`` (``tsjax.diffusion.layers.attention``).
    single_extraction: one marching-tets extraction per step shared by all renders and regularisers
      (False: the distilled views and the contextual views each extract the surface, as the
      reference implementation does).
    fuse_contextual: contextual loss inside the one jitted step (False: its gradient is a second
      jitted function and the update a third).
    donate: donate the state buffers to the step (in-place update).
    remat: rematerialisation of the differentiated networks (VAE encoder, LoRA UNet): ``"none"``,
      ``"dots"`` (save only matmul/conv outputs), ``"full"`` (save nothing; recompute in the backward).
    devices: stage-2 assets are optimised together, sharded over this many devices (``--devices``;
      ``tsjax.parallel``); 1 = one asset at a time.
    conv_algorithm: ``"direct"``, ``"winograd2"`` or ``"winograd4"``: Winograd F(2x2, 3x3) / F(4x4, 3x3)
      for the float32 3x3 stride-1 convs on the CPU kernels (forward and input gradient; large maps
      only), ``tsjax.ops.conv.algorithm``. F(4x4) runs those convs 2.1-2.5x faster than direct and
      rounds 10-50x more (1e-5 - 2.4e-5 of the output scale); F(2x2) 1.6-1.7x faster at the direct
      rounding. On the mid-shape guidance F(4x4) is 1.3x faster than direct (bench/README.md).
      Default ``"direct"``, so results match earlier runs; other platforms (cuDNN) ignore it.
    """

    compute_dtype: str = "auto"
    fuse_unet_passes: bool = True
    attention_impl: str = "auto"
    single_extraction: bool = True
    fuse_contextual: bool = True
    donate: bool = True
    remat: str = "none"
    devices: int = 1
    conv_algorithm: str = "direct"

    def __post_init__(self):
        if self.compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"perf.compute_dtype {self.compute_dtype!r} is not one of {', '.join(COMPUTE_DTYPES)}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"perf.remat {self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
        if self.attention_impl not in ("auto", "xla", "cudnn", "einsum"):
            raise ValueError(f"perf.attention_impl {self.attention_impl!r} is not one of auto, xla, cudnn, einsum")
        if self.devices < 1:
            raise ValueError(f"perf.devices must be >= 1, got {self.devices}")
        if self.conv_algorithm not in CONV_ALGORITHMS:
            raise ValueError(f"perf.conv_algorithm {self.conv_algorithm!r} is not one of {', '.join(CONV_ALGORITHMS)}")


#: The unoptimised reference variant (float32, one UNet call per term, two extractions, separate jits).
PLAIN_PERF = PerfConfig(compute_dtype="float32", fuse_unet_passes=False, attention_impl="xla",
                        single_extraction=False, fuse_contextual=False, donate=False, remat="none")


@_frozen
class Config:
    """The whole pipeline configuration (see the section classes).

    seed: the root of every random draw. stage2_seed: folded into each asset's stage-2 key (cameras,
    timesteps, noise) when non-zero; rerunning with another value on the same ``--out`` caches redoes
    stage 2 only, with new draws (0: the key of ``seed`` alone).
    """

    name: str = "default"
    data: DataConfig = DataConfig()
    theme_prior: ThemePriorConfig = ThemePriorConfig()
    concept_prior: ConceptPriorConfig = ConceptPriorConfig()
    reference_prior: ReferencePriorConfig = ReferencePriorConfig()
    init: InitConfig = InitConfig()
    guidance: GuidanceConfig = GuidanceConfig()
    geometry: GeometryConfig = GeometryConfig()
    optim: OptimConfig = OptimConfig()
    reg: RegularizerConfig = RegularizerConfig()
    camera: CameraConfig = CameraConfig()
    render: RenderConfig = RenderConfig()
    perf: PerfConfig = PerfConfig()
    steps: int = 5000
    checkpoint_every: int = 500
    log_every: int = 10
    seed: int = 0
    stage2_seed: int = 0


# ----------------------------------------------------------------------------------------------
# Overrides
# ----------------------------------------------------------------------------------------------


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def flat_keys(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """``{"section.field": type}`` of every leaf field of a config dataclass (nested sections expanded)."""
    out = {}
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if dataclasses.is_dataclass(v):
            out.update(flat_keys(v, prefix + f.name + "."))
        else:
            out[prefix + f.name] = hints[f.name]
    return out


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def _coerce(key: str, text: str, typ: Any) -> Any:
    text = text.strip()
    origin = typing.get_origin(typ)
    args = typing.get_args(typ)
    if origin in (typing.Union, types.UnionType):
        if text.lower() == "none" and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(key, text, inner[0])
    if typ is bool:
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"--set {key}={text}: expected a boolean (true/false/1/0)")
    if typ in (int, float, str):
        try:
            if typ is int:
                try:
                    return int(text)
                except ValueError:
                    f = float(text)
                    if not f.is_integer():
                        raise
                    return int(f)
            return typ(text)
        except ValueError:
            raise ValueError(f"--set {key}={text}: expected {typ.__name__}") from None
    if origin is tuple:
        parts = [p for p in text.strip("()[] ").split(",") if p.strip()]
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, p, args[0]) for p in parts)
        if len(parts) != len(args):
            raise ValueError(f"--set {key}={text}: expected {len(args)} comma-separated values")
        return tuple(_coerce(key, p, a) for p, a in zip(parts, args))
    raise ValueError(f"--set {key}: fields of type {typ} cannot be set from the command line")


def _replace_path(cfg: Any, path: list[str], value: Any) -> Any:
    if len(path) == 1:
        return dataclasses.replace(cfg, **{path[0]: value})
    child = getattr(cfg, path[0])
    return dataclasses.replace(cfg, **{path[0]: _replace_path(child, path[1:], value)})


def apply_overrides(cfg: Config, overrides: list[str] | tuple[str, ...]) -> Config:
    """Return ``cfg`` with ``"dotted.key=value"`` overrides applied (type-coerced, re-validated).

    Raises ``ValueError`` naming the key for a malformed item, an unknown key (listing the valid
    keys) or a value that does not parse as the field's type.
    """
    keys = flat_keys(cfg)
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--set {item!r}: expected key=value")
        key, text = item.split("=", 1)
        key = key.strip()
        if key not in keys:
            raise ValueError(f"--set {key}: unknown config key; valid keys: {', '.join(sorted(keys))}")
        cfg = _replace_path(cfg, key.split("."), _coerce(key, text, keys[key]))
    return cfg


def to_dict(cfg: Any) -> dict:
    """Plain nested dict (JSON-serialisable: tuples become lists) of a config."""

    def conv(v):
        if isinstance(v, tuple):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return conv(dataclasses.asdict(cfg))


def load_config(spec: str) -> Config:
    """Preset by name (``tiny``, ``paper``: ``configs/<name>.py`` of this repository) or a path to a
    Python file defining ``get_config() -> Config``."""
    path = Path(spec)
    if not spec.endswith(".py"):
        path = Path(__file__).resolve().parents[1] / "configs" / f"{spec}.py"
        if not path.is_file():
            raise FileNotFoundError(f"--config {spec}: no preset named {spec!r} (expected {path})")
    elif not path.is_file():
        raise FileNotFoundError(f"--config {spec}: file not found")
    mod_spec = importlib.util.spec_from_file_location(f"tsjax_config_{path.stem}", path)
    mod = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(mod)
    if not hasattr(mod, "get_config"):
        raise ValueError(f"--config {spec}: {path} defines no get_config()")
    cfg = mod.get_config()
    if not isinstance(cfg, Config):
        raise ValueError(f"--config {spec}: get_config() returned {type(cfg).__name__}, expected tsjax.config.Config")
    return cfg
