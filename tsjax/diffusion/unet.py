"""Flax ``UNet2DConditionModel`` for Stable Diffusion 1.x / 2.x, NHWC, with an optional camera embedding.

The module mirrors diffusers' ``UNet2DConditionModel`` (down: ``CrossAttnDownBlock2D`` / ``DownBlock2D``;
mid: ``UNetMidBlock2DCrossAttn``; up: ``CrossAttnUpBlock2D`` / ``UpBlock2D``) so that diffusers checkpoints
load through :mod:`tsjax.diffusion.convert` and outputs agree with PyTorch to float32 round-off.

Camera conditioning (ThemeStation's VSD LoRA UNet): with ``camera_embed_dim=16`` a ``TimestepEmbedding``
MLP (``camera_embedding``: 16 -> time_embed_dim, e.g. 1280 for SD) maps the flattened row-major 4x4
camera-to-world matrix to a vector added to the time embedding. In diffusers terms this is exactly
``class_embed_type="projection"`` with ``projection_class_embeddings_input_dim=16`` (``class_embedding``,
fed ``class_labels=camera``), which is how :meth:`UNetConfig.to_diffusers` / ``from_diffusers`` map it.
"""
from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from tsjax.diffusion.layers import (Downsample2D, ResnetBlock2D, TimestepEmbedding, Transformer2D, Upsample2D,
                                    config_from_dict, conv, group_norm, timestep_embedding)

__all__ = ["UNetConfig", "UNet2DConditionModel"]

_DOWN = ("CrossAttnDownBlock2D", "DownBlock2D")
_UP = ("CrossAttnUpBlock2D", "UpBlock2D")

# diffusers config keys we accept only at their default (inert) values; anything else is unsupported.
_DIFFUSERS_DEFAULTS = {
    "only_cross_attention": False, "dual_cross_attention": False, "act_fn": "silu",
    "mid_block_type": "UNetMidBlock2DCrossAttn", "resnet_time_scale_shift": "default",
    "downsample_padding": 1, "mid_block_scale_factor": 1, "num_class_embeds": None,
    "addition_embed_type": None, "addition_time_embed_dim": None, "encoder_hid_dim": None,
    "encoder_hid_dim_type": None, "time_embedding_type": "positional", "time_embedding_dim": None,
    "time_embedding_act_fn": None, "timestep_post_act": None, "time_cond_proj_dim": None,
    "conv_in_kernel": 3, "conv_out_kernel": 3, "class_embeddings_concat": False,
    "mid_block_only_cross_attention": None, "cross_attention_norm": None, "attention_type": "default",
    "resnet_skip_time_act": False, "resnet_out_scale_factor": 1.0, "reverse_transformer_layers_per_block": None,
    "addition_embed_type_num_heads": 64, "dropout": 0.0,
}
# diffusers keys that have no effect on the fp32 function computed here.
_IGNORED = {"_class_name", "_diffusers_version", "_name_or_path", "upcast_attention",
            "_use_default_values"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class UNetConfig:
    """Architecture of a :class:`UNet2DConditionModel`; field names are diffusers' config keys.

    ``attention_head_dim`` follows diffusers' (historically misnamed) meaning: it is the **number of
    heads** per block when ``num_attention_heads`` is None (SD 1.x: 8 everywhere; SD 2.x: (5, 10, 20, 20),
    i.e. 64-dim heads). ``camera_embed_dim``: None, or the size of the camera vector (16) embedded by a
    ``TimestepEmbedding`` and added to the time embedding. ``sample_size`` is the latent resolution.
    The scheduler's ``prediction_type`` is not part of the UNet.
    """

    sample_size: int = 64
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple[str, ...] = ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D",
                                         "DownBlock2D")
    up_block_types: tuple[str, ...] = ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D",
                                       "CrossAttnUpBlock2D")
    block_out_channels: tuple[int, ...] = (320, 640, 1280, 1280)
    layers_per_block: int = 2
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    cross_attention_dim: int = 768
    transformer_layers_per_block: int | tuple[int, ...] = 1
    attention_head_dim: int | tuple[int, ...] = 8
    num_attention_heads: int | tuple[int, ...] | None = None
    use_linear_projection: bool = False
    camera_embed_dim: int | None = None

    def __post_init__(self):
        n = len(self.block_out_channels)
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"UNetConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({n}) must have equal length")
        for t in self.down_block_types:
            if t not in _DOWN:
                raise ValueError(f"UNetConfig: unsupported down block type {t!r} (supported: {_DOWN})")
        for t in self.up_block_types:
            if t not in _UP:
                raise ValueError(f"UNetConfig: unsupported up block type {t!r} (supported: {_UP})")
        for name in ("attention_head_dim", "num_attention_heads", "transformer_layers_per_block"):
            v = getattr(self, name)
            if isinstance(v, tuple) and len(v) != n:
                raise ValueError(f"UNetConfig: {name} has {len(v)} entries, expected one per block ({n})")
        for c, h in zip(self.block_out_channels, self.heads):
            if c % h:
                raise ValueError(f"UNetConfig: {c} channels are not divisible by {h} attention heads")

    # ---- derived quantities ------------------------------------------------------------------------------
    def _per_block(self, v) -> tuple[int, ...]:
        return tuple(v) if isinstance(v, (tuple, list)) else (int(v),) * len(self.block_out_channels)

    @property
    def heads(self) -> tuple[int, ...]:
        """Attention heads per block (diffusers: ``num_attention_heads or attention_head_dim``)."""
        return self._per_block(self.num_attention_heads if self.num_attention_heads is not None
                               else self.attention_head_dim)

    @property
    def depths(self) -> tuple[int, ...]:
        """Transformer blocks per ``Transformer2DModel`` in each down block."""
        return self._per_block(self.transformer_layers_per_block)

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.block_out_channels[0]

    # ---- diffusers interop -------------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, cfg: dict, *, source: str = "config") -> "UNetConfig":
        """Build from a diffusers ``unet/config.json`` dict; unsupported options raise ``ValueError``.

        ``class_embed_type="projection"`` becomes ``camera_embed_dim=projection_class_embeddings_input_dim``.
        """
        cfg = dict(cfg)
        cam = None
        cet = cfg.pop("class_embed_type", None)
        pdim = cfg.pop("projection_class_embeddings_input_dim", None)
        if cet == "projection":
            cam = int(pdim)
        elif cet is not None:
            raise ValueError(f"{source}: class_embed_type={cet!r} is not supported (only 'projection', used as "
                             f"the camera embedding)")
        if isinstance(cfg.get("layers_per_block"), (list, tuple)):
            raise ValueError(f"{source}: per-block layers_per_block={cfg['layers_per_block']} is not supported")
        return config_from_dict(cls, cfg, source=source, what="UNet", defaults=_DIFFUSERS_DEFAULTS,
                                ignored=_IGNORED, camera_embed_dim=cam)

    def to_diffusers(self) -> dict:
        """The diffusers ``UNet2DConditionModel`` config dict computing the same function."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        cam = d.pop("camera_embed_dim")
        d.update(mid_block_type="UNetMidBlock2DCrossAttn", act_fn="silu", downsample_padding=1)
        if cam is not None:
            d.update(class_embed_type="projection", projection_class_embeddings_input_dim=cam)
        return d

    # ---- presets -----------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "UNetConfig":
        """A small SD-2-style UNet for CPU runs and from-scratch priors (~0.5M params).

        Latent 16x16x4 (64 px images through :meth:`VAEConfig.tiny`), channels (32, 64), one resnet per level,
        cross-attention on both levels with 8-dim heads (4 and 8 heads), context dim 32, linear projections.
        """
        base = dict(sample_size=16, block_out_channels=(32, 64),
                    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1,
                    norm_num_groups=8, cross_attention_dim=32, attention_head_dim=(4, 8),
                    use_linear_projection=True)
        base.update(overrides)
        return cls(**base)


class _DownBlock(nn.Module):
    out_channels: int
    num_layers: int
    heads: int | None  # None: no attention (DownBlock2D)
    depth: int
    add_downsample: bool
    cfg: UNetConfig
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        skips = []
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.heads is not None:
                x = Transformer2D(self.heads, self.out_channels // self.heads, self.depth, cfg.use_linear_projection,
                                  cfg.norm_num_groups, self.impl, self.dtype, name=f"attentions_{i}")(x, context)
            skips.append(x)
        if self.add_downsample:
            x = Downsample2D(self.out_channels, 1, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, skips


class _UpBlock(nn.Module):
    out_channels: int
    num_layers: int
    heads: int | None
    depth: int
    add_upsample: bool
    cfg: UNetConfig
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x, skips, temb, context):
        cfg = self.cfg
        for i in range(self.num_layers):
            x = jnp.concatenate([x, skips[-1 - i]], axis=-1)
            x = ResnetBlock2D(self.out_channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype,
                              name=f"resnets_{i}")(x, temb)
            if self.heads is not None:
                x = Transformer2D(self.heads, self.out_channels // self.heads, self.depth, cfg.use_linear_projection,
                                  cfg.norm_num_groups, self.impl, self.dtype, name=f"attentions_{i}")(x, context)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class _MidBlock(nn.Module):
    channels: int
    heads: int
    depth: int
    cfg: UNetConfig
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x, temb, context):
        cfg = self.cfg
        x = ResnetBlock2D(self.channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="resnets_0")(x, temb)
        x = Transformer2D(self.heads, self.channels // self.heads, self.depth, cfg.use_linear_projection,
                          cfg.norm_num_groups, self.impl, self.dtype, name="attentions_0")(x, context)
        return ResnetBlock2D(self.channels, cfg.norm_num_groups, cfg.norm_eps, self.dtype, name="resnets_1")(x, temb)


class UNet2DConditionModel(nn.Module):
    """Conditional denoising UNet (Stable Diffusion 1.x / 2.x), NHWC.

    ``apply({'params': p}, sample, timesteps, encoder_hidden_states, camera=None)``:

    * ``sample`` ``[B, h, w, in_channels]`` noisy latents (``h, w`` divisible by ``2**(levels-1)``);
    * ``timesteps`` ``[B]`` or scalar (int or float, diffusion step index in [0, num_train_timesteps));
    * ``encoder_hidden_states`` ``[B, L, cross_attention_dim]`` text embeddings;
    * ``camera`` ``[B, camera_embed_dim]`` (flattened row-major c2w) or None. A camera-conditioned model
      called with ``camera=None`` omits the camera term (parameters are still created at ``init``); a
      model without ``camera_embed_dim`` rejects a camera.

    Returns the model output (noise or v, per the scheduler's ``prediction_type``) ``[B, h, w, out_channels]``
    in the compute ``dtype``. Attributes: ``dtype`` (compute dtype; params stay float32) and
    ``attention_impl`` (``"auto"``, ``"xla"``, ``"cudnn"``, ``"einsum"``; see :func:`layers.attention`).
    """

    config: UNetConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, camera=None):
        cfg, dt, impl = self.config, self.dtype, self.attention_impl
        b = sample.shape[0]
        if cfg.center_input_sample:
            sample = 2.0 * sample - 1.0
        t = jnp.broadcast_to(jnp.asarray(timesteps), (b,))
        t_emb = timestep_embedding(t, cfg.block_out_channels[0], cfg.flip_sin_to_cos, cfg.freq_shift).astype(dt)
        temb = TimestepEmbedding(cfg.time_embed_dim, dt, name="time_embedding")(t_emb)
        if cfg.camera_embed_dim is not None:
            cam_mlp = TimestepEmbedding(cfg.time_embed_dim, dt, name="camera_embedding")
            if camera is not None:
                if camera.shape != (b, cfg.camera_embed_dim):
                    raise ValueError(f"camera must have shape ({b}, {cfg.camera_embed_dim}), got {camera.shape}")
                temb = temb + cam_mlp(camera.astype(dt))
            elif self.is_initializing():
                cam_mlp(jnp.zeros((b, cfg.camera_embed_dim), dt))
        elif camera is not None:
            raise ValueError("camera given to a UNet without camera embedding (config.camera_embed_dim is None)")
        ctx = encoder_hidden_states.astype(dt)

        x = conv(cfg.block_out_channels[0], 3, "conv_in", dt)(sample.astype(dt))
        skips = [x]
        heads, depths, n = cfg.heads, cfg.depths, len(cfg.block_out_channels)
        for i, (btype, ch) in enumerate(zip(cfg.down_block_types, cfg.block_out_channels)):
            x, s = _DownBlock(ch, cfg.layers_per_block, heads[i] if btype == "CrossAttnDownBlock2D" else None,
                              depths[i], i < n - 1, cfg, impl, dt, name=f"down_blocks_{i}")(x, temb, ctx)
            skips += s
        x = _MidBlock(cfg.block_out_channels[-1], heads[-1], depths[-1], cfg, impl, dt, name="mid_block")(x, temb, ctx)
        rev_ch, rev_heads, rev_depths = cfg.block_out_channels[::-1], heads[::-1], depths[::-1]
        for i, btype in enumerate(cfg.up_block_types):
            k = cfg.layers_per_block + 1
            block_skips, skips = skips[-k:], skips[:-k]
            x = _UpBlock(rev_ch[i], k, rev_heads[i] if btype == "CrossAttnUpBlock2D" else None, rev_depths[i],
                         i < n - 1, cfg, impl, dt, name=f"up_blocks_{i}")(x, block_skips, temb, ctx)
        x = group_norm(cfg.norm_num_groups, cfg.norm_eps, "conv_norm_out", dt, silu=True)(x)
        return conv(cfg.out_channels, 3, "conv_out", dt)(x)

    def param_shapes(self, batch: int = 1, seq_len: int = 8) -> dict:
        """The params tree as ``jax.ShapeDtypeStruct`` leaves (``jax.eval_shape`` of ``init``; no memory)."""
        cfg = self.config
        s = cfg.sample_size
        cam = None if cfg.camera_embed_dim is None else jnp.zeros((batch, cfg.camera_embed_dim))

        def init(k):
            return self.init(k, jnp.zeros((batch, s, s, cfg.in_channels)), jnp.zeros((batch,), jnp.int32),
                             jnp.zeros((batch, seq_len, cfg.cross_attention_dim)), cam)["params"]

        return jax.eval_shape(init, jax.random.key(0))

    def init_params(self, key: jax.Array, batch: int = 1, seq_len: int = 77) -> dict:
        """Random float32 params with Flax's default initialisers (kernels LeCun-normal, i.e. truncated normal
        with variance ``1 / fan_in``; biases 0; norm scales 1).

        The tree is traced with :func:`jax.eval_shape` for a ``[batch, sample_size, sample_size,
        in_channels]`` input and the kernels are drawn from one random vector: much faster than ``init``
        on CPU (which compiles the whole forward pass). Same key -> same params. Not traceable (host
        slicing); use :meth:`param_shapes` for shapes.
        """
        flat = traverse_util.flatten_dict(self.param_shapes(batch, seq_len))
        kernels = sorted(p for p in flat if p[-1] == "kernel")
        other = [p for p in flat if p[-1] not in ("kernel", "bias", "scale")]
        if other:  # pragma: no cover - guards future layer kinds
            raise ValueError(f"init_params: no initialiser for {'/'.join(other[0])}")
        shapes = tuple(tuple(flat[p].shape) for p in kernels)

        sizes = [math.prod(sh) for sh in shapes]
        # lecun_normal: truncated N(0, 1) on [-2, 2] rescaled to unit variance, times 1/sqrt(fan_in). One
        # random vector (a single small compile), sliced on the host.
        z = jax.jit(lambda k: jax.random.truncated_normal(k, -2.0, 2.0, (sum(sizes),), jnp.float32)
                    / .87962566103423978)(key)
        z = np.asarray(z)
        starts = [0, *itertools.accumulate(sizes)]
        out = {p: jnp.asarray(z[a:a + n].reshape(sh) / np.float32(math.sqrt(math.prod(sh[:-1]))))
               for p, sh, a, n in zip(kernels, shapes, starts, sizes)}
        for p, v in flat.items():
            if p[-1] != "kernel":
                out[p] = jnp.asarray((np.ones if p[-1] == "scale" else np.zeros)(v.shape, np.float32))
        return traverse_util.unflatten_dict(out)
