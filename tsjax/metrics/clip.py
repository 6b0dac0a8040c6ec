"""CLIP (vision + text towers, projections, logit scale) in Flax, loading transformers ``CLIPModel``
folders (``config.json`` + ``model.safetensors``) from local disk, and CLIP scores.

Architecture (as transformers' ``CLIPModel``): the vision tower embeds p x p patches with a bias-free
convolution, prepends ``class_embedding``, adds learned position embeddings, applies ``pre_layrnorm``,
then pre-LN transformer layers (``layer_norm1`` -> multi-head self-attention -> residual,
``layer_norm2`` -> MLP fc1/act/fc2 -> residual); the pooled output is ``post_layernorm`` of the class
token and ``visual_projection`` (no bias) maps it to the joint space. The text tower is the diffusion
stack's :class:`tsjax.diffusion.clip_text.CLIPTextModel` (token + position embeddings, the same layers with
a causal mask, ``final_layer_norm``, hidden state pooled at the end-of-text token), and
``text_projection`` maps its pooled output to the joint space. Both towers share
:class:`tsjax.diffusion.clip_text.CLIPEncoder` (causal for text, full attention for vision).

Images are NHWC float32 sRGB in [0, 1]; ``preprocess`` reproduces ``CLIPImageProcessor`` (resize the
shortest side with bicubic filtering, centre crop, normalise with the CLIP mean/std) in JAX.

Scores (documented convention, as torchmetrics' CLIPScore): ``100 * max(cos(e_a, e_b), 0)`` between
L2-normalised embeddings, for image-text and image-image pairs; range [0, 100].
"""
from __future__ import annotations

import json
from functools import partial
from dataclasses import dataclass, field, fields
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from tsjax.diffusion.clip_text import HIDDEN_ACTS, CLIPEncoder, CLIPTextConfig, CLIPTextModel

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class CLIPTowerConfig:
    """The vision tower (keys as in transformers' ``CLIPVisionConfig``). The text tower is
    :class:`tsjax.diffusion.clip_text.CLIPTextConfig`."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3

    def __post_init__(self):
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"CLIP vision hidden_act={self.hidden_act!r} is not supported (supported: {HIDDEN_ACTS})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIP vision hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_dict(cls, d: dict) -> "CLIPTowerConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names and v is not None})


def _text_config(d: dict) -> CLIPTextConfig:
    """The ``text_config`` of a ``CLIPModel`` config.json as the diffusion text encoder's config (keys it
    does not use, e.g. ``projection_dim`` or generation defaults, are skipped; ``None`` means default)."""
    names = {f.name for f in fields(CLIPTextConfig)}
    return CLIPTextConfig(**{k: v for k, v in d.items() if k in names and v is not None})


@dataclass(frozen=True)
class CLIPConfig:
    """transformers ``CLIPConfig``: both towers, the joint-space size and the logit scale init."""

    vision: CLIPTowerConfig = field(default_factory=CLIPTowerConfig)
    text: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    projection_dim: int = 512

    @classmethod
    def from_json(cls, path: str | Path) -> "CLIPConfig":
        path = Path(path)
        try:
            d = json.loads(path.read_text())
        except FileNotFoundError:
            raise FileNotFoundError(f"CLIP config not found: {path}") from None
        if "vision_config" not in d or "text_config" not in d:
            raise ValueError(f"{path}: not a CLIPModel config (needs vision_config and text_config)")
        try:
            return cls(vision=CLIPTowerConfig.from_dict(d["vision_config"]), text=_text_config(d["text_config"]),
                       projection_dim=int(d.get("projection_dim", 512)))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{path}: {e}") from None


class _VisionEmbeddings(nn.Module):
    cfg: CLIPTowerConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        p = c.patch_size
        x = nn.Conv(c.hidden_size, (p, p), strides=(p, p), padding="VALID", use_bias=False,
                    name="patch_embedding")(pixels)
        b = x.shape[0]
        x = x.reshape(b, -1, c.hidden_size)
        cls = self.param("class_embedding", nn.initializers.normal(0.02), (c.hidden_size,))
        x = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, c.hidden_size)), x], axis=1)
        n_pos = (c.image_size // p) ** 2 + 1
        pos = nn.Embed(n_pos, c.hidden_size, name="position_embedding")(jnp.arange(n_pos))
        return x + pos[None]


class CLIPVisionTransformer(nn.Module):
    """``apply(params, pixels [B, S, S, 3] normalised, S = image_size) -> (last_hidden [B,N+1,D], pooled [B,D])``.

    The transformer layers are the diffusion text encoder's :class:`~tsjax.diffusion.clip_text.CLIPEncoder`
    with full (non-causal) attention.
    """

    cfg: CLIPTowerConfig

    @nn.compact
    def __call__(self, pixels):
        c = self.cfg
        if pixels.shape[1:3] != (c.image_size, c.image_size):
            raise ValueError(f"CLIP vision input must be {c.image_size}x{c.image_size}, got {pixels.shape}")
        x = _VisionEmbeddings(c, name="embeddings")(pixels)
        x = nn.LayerNorm(c.layer_norm_eps, name="pre_layrnorm")(x)
        x = CLIPEncoder(c, causal=False, name="encoder")(x)
        pooled = nn.LayerNorm(c.layer_norm_eps, name="post_layernorm")(x[:, 0])
        return x, pooled


class CLIPModel(nn.Module):
    """Both towers + projections. Methods (use ``apply(..., method=...)``):

    - ``image_embeds(pixels [B,S,S,3] normalised) -> [B, projection_dim]`` (not normalised)
    - ``text_embeds(input_ids [B,L]) -> [B, projection_dim]`` (not normalised)
    - ``__call__(pixels, input_ids) -> logits_per_image [B_img, B_txt]`` = exp(logit_scale) * cos.
    """

    cfg: CLIPConfig

    def setup(self):
        self.vision_model = CLIPVisionTransformer(self.cfg.vision)
        self.text_model = CLIPTextModel(self.cfg.text)
        self.visual_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)
        self.text_projection = nn.Dense(self.cfg.projection_dim, use_bias=False)
        self.logit_scale = self.param("logit_scale", nn.initializers.constant(np.log(1 / 0.07)), ())

    def image_embeds(self, pixels):
        return self.visual_projection(self.vision_model(pixels)[1])

    def text_embeds(self, input_ids):
        return self.text_projection(self.text_model(input_ids)[1])

    def __call__(self, pixels, input_ids):
        a = _l2(self.image_embeds(pixels))
        t = _l2(self.text_embeds(input_ids))
        return jnp.exp(self.logit_scale) * a @ t.T


def _l2(x):
    return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


# ----------------------------------------------------------------------------------------------------
# Weights


def convert_clip_state_dict(sd: dict[str, np.ndarray], source: str = "state dict") -> dict:
    """transformers ``CLIPModel`` state dict -> Flax params of ``CLIPModel`` (no network, numpy in)."""
    params: dict = {}
    for key, val in sd.items():
        if key.endswith("position_ids"):
            continue
        parts = key.split(".")
        path: list[str] = []
        i = 0
        while i < len(parts):
            if parts[i] == "layers" and i + 1 < len(parts) and parts[i + 1].isdigit():
                path.append(f"layers_{parts[i + 1]}")
                i += 2
            else:
                path.append(parts[i])
                i += 1
        leaf = path[-1]
        val = np.asarray(val, np.float32)
        if leaf == "weight":
            owner = path[-2]
            if owner == "patch_embedding":
                path[-1], val = "kernel", val.transpose(2, 3, 1, 0)
            elif owner in ("token_embedding", "position_embedding"):
                path[-1] = "embedding"
            elif "norm" in owner or "layrnorm" in owner:
                path[-1] = "scale"
            elif val.ndim == 2:
                path[-1], val = "kernel", val.T
            else:
                raise ValueError(f"{source}: unexpected weight {key} with shape {val.shape}")
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = jnp.asarray(val)
    for need in ("vision_model", "text_model", "visual_projection", "text_projection", "logit_scale"):
        if need not in params:
            raise ValueError(f"{source}: not a CLIPModel checkpoint (no {need!r} weights)")
    return {"params": params}


@dataclass(frozen=True)
class CLIP:
    """A loaded CLIP: config, Flax variables and preprocessing settings.

    Attributes:
      cfg: CLIPConfig. variables: {'params': ...}. crop_size / resize_size: CLIPImageProcessor sizes
      (from preprocessor_config.json when present, else ``image_size``). mean / std: normalisation.
      folder: where it was loaded from.
    """

    cfg: CLIPConfig
    variables: dict
    resize_size: int
    crop_size: int
    mean: tuple = CLIP_MEAN
    std: tuple = CLIP_STD
    folder: str = ""

    def preprocess(self, images: jax.Array) -> jax.Array:
        return preprocess(images, self.resize_size, self.crop_size, self.mean, self.std)

    def image_embeds(self, images: jax.Array, *, normalize: bool = True) -> jax.Array:
        """sRGB images [B, H, W, 3] in [0, 1] (any size) -> embeddings [B, projection_dim] (L2-normalised)."""
        e = _image_embeds_jit(self.cfg, self.variables, self.preprocess(images))
        return _l2(e) if normalize else e

    def text_embeds(self, input_ids, *, normalize: bool = True) -> jax.Array:
        """Token ids [B, L] int -> embeddings [B, projection_dim] (L2-normalised)."""
        e = _text_embeds_jit(self.cfg, self.variables, jnp.asarray(input_ids, jnp.int32))
        return _l2(e) if normalize else e

    def tokenize(self, texts: list[str]) -> np.ndarray:
        """Token ids [B, L] with the folder's CLIPTokenizer (local files only; padded to the longest)."""
        from transformers import CLIPTokenizer

        try:
            tok = CLIPTokenizer.from_pretrained(self.folder, local_files_only=True)
        except (OSError, TypeError, ValueError) as e:
            raise FileNotFoundError(f"{self.folder}: no CLIP tokenizer files (vocab.json, merges.txt)") from e
        ids = tok(list(texts), padding=True, truncation=True,
                  max_length=self.cfg.text.max_position_embeddings, return_tensors="np")["input_ids"]
        return np.asarray(ids, np.int32)


@partial(jax.jit, static_argnums=0)
def _image_embeds_jit(cfg, variables, pixels):
    return CLIPModel(cfg).apply(variables, pixels, method=CLIPModel.image_embeds)


@partial(jax.jit, static_argnums=0)
def _text_embeds_jit(cfg, variables, ids):
    return CLIPModel(cfg).apply(variables, ids, method=CLIPModel.text_embeds)


def load_clip(folder: str | Path) -> CLIP:
    """Load a transformers ``CLIPModel`` folder (config.json + model.safetensors [+ preprocessor_config.json])."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"CLIP folder not found: {folder}")
    cfg = CLIPConfig.from_json(folder / "config.json")
    st = folder / "model.safetensors"
    if st.is_file():
        from safetensors.numpy import load_file

        sd = load_file(str(st))
    elif (folder / "pytorch_model.bin").is_file():
        from tsjax.metrics.vgg import read_state_dict

        sd = read_state_dict(folder / "pytorch_model.bin")
    else:
        raise FileNotFoundError(f"{folder}: no model.safetensors (or pytorch_model.bin)")
    variables = convert_clip_state_dict(sd, source=str(folder))
    resize, crop = cfg.vision.image_size, cfg.vision.image_size
    mean, std = CLIP_MEAN, CLIP_STD
    pp = folder / "preprocessor_config.json"
    if pp.is_file():
        d = json.loads(pp.read_text())
        size = d.get("size", resize)
        resize = int(size.get("shortest_edge", resize)) if isinstance(size, dict) else int(size)
        cs = d.get("crop_size", crop)
        crop = int(cs.get("height", crop)) if isinstance(cs, dict) else int(cs)
        mean = tuple(d.get("image_mean", mean))
        std = tuple(d.get("image_std", std))
    if crop != cfg.vision.image_size:
        raise ValueError(f"{pp}: crop_size {crop} differs from the vision image_size {cfg.vision.image_size}")
    return CLIP(cfg, variables, resize, crop, mean, std, str(folder))


# ----------------------------------------------------------------------------------------------------
# Preprocessing and scores


def preprocess(images: jax.Array, resize_size: int, crop_size: int, mean=CLIP_MEAN, std=CLIP_STD) -> jax.Array:
    """CLIPImageProcessor in JAX: sRGB [B, H, W, 3] in [0, 1] -> normalised [B, crop, crop, 3].

    The shortest side is resized to ``resize_size`` (bicubic, antialiased when shrinking, like PIL;
    the other side as int(resize * long / short), transformers' rule), the centre ``crop_size`` square is
    cut, then (x - mean) / std. HF additionally rounds the resized image to uint8; that is skipped here
    (differences <= 1/255 before normalisation).
    """
    x = jnp.asarray(images, jnp.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim != 4 or x.shape[-1] != 3:
        raise ValueError(f"images must be [B,H,W,3] sRGB in [0,1], got shape {x.shape}")
    b, h, w, _ = x.shape
    if h <= w:
        nh, nw = resize_size, int(resize_size * w / h)
    else:
        nh, nw = int(resize_size * h / w), resize_size
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, 3), method="bicubic", antialias=True)
    top, left = (nh - crop_size) // 2, (nw - crop_size) // 2
    if top < 0 or left < 0:
        raise ValueError(f"crop {crop_size} larger than resized image {nh}x{nw}")
    x = jnp.clip(x[:, top:top + crop_size, left:left + crop_size], 0.0, 1.0)
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def clip_score(emb_a: jax.Array, emb_b: jax.Array) -> jax.Array:
    """Pairwise CLIP score 100 * max(cos, 0) between rows of ``emb_a`` [N, D] and ``emb_b`` [M, D] -> [N, M]."""
    return 100.0 * jnp.maximum(_l2(jnp.asarray(emb_a)) @ _l2(jnp.asarray(emb_b)).T, 0.0)
