"""Flax ``AutoencoderKL`` (the Stable Diffusion VAE), NHWC, loading diffusers checkpoints.

The module mirrors diffusers' ``AutoencoderKL`` (``Encoder`` of ``DownEncoderBlock2D`` + ``UNetMidBlock2D``,
``Decoder`` of ``UNetMidBlock2D`` + ``UpDecoderBlock2D``, optional 1x1 ``quant_conv`` / ``post_quant_conv``)
with identical sub-module names, so ``tsjax.diffusion.convert.load_vae`` maps a diffusers state dict onto it
and outputs agree with PyTorch to float32 round-off.

Conventions: images ``[B, H, W, in_channels]`` in [-1, 1] (NHWC, row 0 = top), ``H`` and ``W`` multiples of
the latent factor ``f = 2 ** (len(block_out_channels) - 1)`` (8 for Stable Diffusion). Latents are
``[B, H/f, W/f, latent_channels]`` and **unscaled**: a diffusion model sees ``z * scaling_factor`` and the
decoder must be given ``z_scaled / scaling_factor``.

Numerics as diffusers: GroupNorm eps 1e-6 everywhere, the encoder's stride-2 convs pad only the right/bottom
by one pixel, the decoder upsamples nearest-neighbour, the mid-block attention is single-head over all
``H*W`` positions with biased q/k/v projections, and ``logvar`` is clipped to [-30, 20].
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.diffusion.layers import (Downsample2D, ResnetBlock2D, Upsample2D, attention, config_from_dict, conv,
                                    dense, group_norm)

__all__ = ["VAEConfig", "AutoencoderKL", "sample_latent"]

_DOWN = "DownEncoderBlock2D"
_UP = "UpDecoderBlock2D"
_EPS = 1e-6
# diffusers keys accepted only at these (default) values.
_DIFFUSERS_DEFAULTS = {"act_fn": "silu", "shift_factor": None, "latents_mean": None, "latents_std": None}
# diffusers keys with no effect on the float32 function computed here (force_upcast is an fp16 switch).
_IGNORED = {"force_upcast"}


@dataclasses.dataclass(frozen=True, kw_only=True)
class VAEConfig:
    """Architecture of :class:`AutoencoderKL`; field names are diffusers' ``AutoencoderKL`` config keys.

    ``block_out_channels``: channels per resolution level (SD: (128, 256, 512, 512), latent factor 8);
    ``layers_per_block`` resnets per encoder level (the decoder has one more); ``latent_channels`` (SD: 4);
    ``norm_num_groups`` GroupNorm groups (every channel count must be divisible by it); ``scaling_factor``
    the latent scale used by diffusion models (SD 1/2: 0.18215); ``sample_size`` the nominal image size
    (informational). ``use_quant_conv`` / ``use_post_quant_conv``: the 1x1 convs around the latent;
    ``mid_block_add_attention``: the mid-block self-attention.
    """

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple[str, ...] = (_DOWN,)
    up_block_types: tuple[str, ...] = (_UP,)
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    sample_size: int | tuple[int, ...] = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        n = len(self.block_out_channels)
        if n == 0:
            raise ValueError("VAEConfig: block_out_channels must not be empty")
        if len(self.down_block_types) != n or len(self.up_block_types) != n:
            raise ValueError(f"VAEConfig: down_block_types ({len(self.down_block_types)}), up_block_types "
                             f"({len(self.up_block_types)}) and block_out_channels ({n}) must have equal length")
        for t in self.down_block_types:
            if t != _DOWN:
                raise ValueError(f"VAEConfig: unsupported down block type {t!r} (supported: {_DOWN!r})")
        for t in self.up_block_types:
            if t != _UP:
                raise ValueError(f"VAEConfig: unsupported up block type {t!r} (supported: {_UP!r})")
        for c in self.block_out_channels:
            if c % self.norm_num_groups:
                raise ValueError(f"VAEConfig: {c} channels are not divisible by norm_num_groups="
                                 f"{self.norm_num_groups}")
        if self.layers_per_block < 1:
            raise ValueError(f"VAEConfig: layers_per_block must be >= 1, got {self.layers_per_block}")

    @property
    def latent_factor(self) -> int:
        """Spatial down-sampling factor image -> latent (``2 ** (levels - 1)``)."""
        return 2 ** (len(self.block_out_channels) - 1)

    # ---- diffusers interop -------------------------------------------------------------------------------
    @classmethod
    def from_diffusers(cls, cfg: dict, *, source: str = "config") -> "VAEConfig":
        """Build from a diffusers ``vae/config.json`` dict.

        Keys that change the computed function at non-default values (``act_fn`` other than ``silu``,
        ``shift_factor`` / ``latents_mean`` / ``latents_std``, which our pipeline would ignore) and unknown
        keys raise ``ValueError`` naming ``source`` and the key; metadata keys (``_...``) are ignored.
        """
        return config_from_dict(cls, cfg, source=source, what="AutoencoderKL", defaults=_DIFFUSERS_DEFAULTS,
                                ignored=_IGNORED)

    def to_diffusers(self) -> dict:
        """The diffusers ``AutoencoderKL`` config dict computing the same function."""
        d = {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}
        d["act_fn"] = "silu"
        return d

    # ---- presets -----------------------------------------------------------------------------------------
    @classmethod
    def tiny(cls, **overrides) -> "VAEConfig":
        """A small VAE for CPU runs and from-scratch priors: channels (32, 32, 64) (latent factor 4, so 64 px
        images give the 16x16x4 latents of ``UNetConfig.tiny()``), one resnet per level, 8 norm groups."""
        base = dict(block_out_channels=(32, 32, 64), down_block_types=(_DOWN,) * 3, up_block_types=(_UP,) * 3,
                    layers_per_block=1, latent_channels=4, norm_num_groups=8, sample_size=64)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def sd(cls, **overrides) -> "VAEConfig":
        """The Stable Diffusion 1.x / 2.x VAE (``stabilityai/sd-vae-ft-*``, 83.7M params, latent factor 8)."""
        base = dict(block_out_channels=(128, 256, 512, 512), down_block_types=(_DOWN,) * 4,
                    up_block_types=(_UP,) * 4, layers_per_block=2, latent_channels=4, norm_num_groups=32,
                    sample_size=512, scaling_factor=0.18215)
        base.update(overrides)
        return cls(**base)


class _MidAttention(nn.Module):
    """diffusers' VAE mid-block ``Attention``: GroupNorm (``group_norm``), single-head self-attention over
    all positions with biased ``to_q``/``to_k``/``to_v``, ``to_out.0``, residual. ``[B,H,W,C] -> [B,H,W,C]``."""

    groups: int
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        y = group_norm(self.groups, _EPS, "group_norm", self.dtype)(x).reshape(b, h * w, c)
        q = dense(c, "to_q", self.dtype)(y).reshape(b, h * w, 1, c)
        k = dense(c, "to_k", self.dtype)(y).reshape(b, h * w, 1, c)
        v = dense(c, "to_v", self.dtype)(y).reshape(b, h * w, 1, c)
        o = attention(q, k, v, impl=self.impl).reshape(b, h * w, c)
        return x + dense(c, "to_out_0", self.dtype)(o).reshape(b, h, w, c)


class _MidBlock(nn.Module):
    """``UNetMidBlock2D`` without time embedding: resnet, (attention), resnet at constant channels."""

    channels: int
    groups: int
    add_attention: bool
    impl: str
    dtype: Any

    @nn.compact
    def __call__(self, x):
        x = ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, name="resnets_0")(x)
        if self.add_attention:
            x = _MidAttention(self.groups, self.impl, self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(self.channels, self.groups, _EPS, self.dtype, name="resnets_1")(x)


class _DownEncoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_downsample: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, self.dtype, name=f"resnets_{i}")(x)
        if self.add_downsample:  # diffusers downsample_padding=0: pad right/bottom by one, stride-2 3x3 conv
            x = Downsample2D(self.out_channels, 0, self.dtype, name="downsamplers_0")(x)
        return x


class _UpDecoderBlock(nn.Module):
    out_channels: int
    num_layers: int
    groups: int
    add_upsample: bool
    dtype: Any

    @nn.compact
    def __call__(self, x):
        for i in range(self.num_layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, self.dtype, name=f"resnets_{i}")(x)
        if self.add_upsample:
            x = Upsample2D(self.out_channels, self.dtype, name="upsamplers_0")(x)
        return x


class Encoder(nn.Module):
    """diffusers VAE ``Encoder`` (``double_z``): ``[B,H,W,in] -> [B,H/f,W/f,2*latent_channels]`` moments."""

    config: VAEConfig
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, dt = self.config, self.dtype
        boc = cfg.block_out_channels
        x = conv(boc[0], 3, "conv_in", dt)(x.astype(dt))
        for i, ch in enumerate(boc):
            x = _DownEncoderBlock(ch, cfg.layers_per_block, cfg.norm_num_groups, i < len(boc) - 1, dt,
                                  name=f"down_blocks_{i}")(x)
        x = _MidBlock(boc[-1], cfg.norm_num_groups, cfg.mid_block_add_attention, self.impl, dt, name="mid_block")(x)
        x = group_norm(cfg.norm_num_groups, _EPS, "conv_norm_out", dt, silu=True)(x)
        return conv(2 * cfg.latent_channels, 3, "conv_out", dt)(x)


class Decoder(nn.Module):
    """diffusers VAE ``Decoder``: ``[B,h,w,latent_channels] -> [B,h*f,w*f,out_channels]``."""

    config: VAEConfig
    impl: str = "auto"
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        cfg, dt = self.config, self.dtype
        rev = cfg.block_out_channels[::-1]
        x = conv(rev[0], 3, "conv_in", dt)(z.astype(dt))
        x = _MidBlock(rev[0], cfg.norm_num_groups, cfg.mid_block_add_attention, self.impl, dt, name="mid_block")(x)
        for i, ch in enumerate(rev):
            x = _UpDecoderBlock(ch, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(rev) - 1, dt,
                                name=f"up_blocks_{i}")(x)
        x = group_norm(cfg.norm_num_groups, _EPS, "conv_norm_out", dt, silu=True)(x)
        return conv(cfg.out_channels, 3, "conv_out", dt)(x)


class AutoencoderKL(nn.Module):
    """The KL-regularised autoencoder of latent diffusion (diffusers ``AutoencoderKL``), NHWC.

    Methods (use with ``apply(..., method=...)``):

    * ``encode(x)``: ``x`` ``[B, H, W, in_channels]`` in [-1, 1] -> ``(mean, logvar)``, each
      ``[B, H/f, W/f, latent_channels]`` float32, ``logvar`` clipped to [-30, 20] (the diagonal Gaussian
      posterior; its mode is ``mean``; see :func:`sample_latent`).
    * ``decode(z)``: unscaled latents ``[B, h, w, latent_channels]`` -> images ``[B, h*f, w*f, out_channels]``
      float32, nominally in [-1, 1] (not clipped).
    * ``__call__(x)``: ``decode(encode(x).mean)`` (the posterior mode); used by ``init`` to create all params.

    Attributes: ``config``; ``dtype`` the compute dtype (params stay float32; GroupNorm statistics are float32;
    outputs are cast to float32); ``attention_impl`` as :func:`tsjax.diffusion.layers.attention`.
    """

    config: VAEConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.attention_impl, self.dtype)
        self.decoder = Decoder(cfg, self.attention_impl, self.dtype)
        mk = lambda c: nn.Conv(c, (1, 1), dtype=self.dtype, param_dtype=jnp.float32)  # noqa: E731
        self.quant_conv = mk(2 * cfg.latent_channels) if cfg.use_quant_conv else None
        self.post_quant_conv = mk(cfg.latent_channels) if cfg.use_post_quant_conv else None

    def encode(self, x):
        f = self.config.latent_factor
        if x.ndim != 4 or x.shape[-1] != self.config.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"AutoencoderKL.encode: expected images [B, H, W, {self.config.in_channels}] with H, W "
                             f"multiples of {f}, got shape {tuple(x.shape)}")
        h = self.encoder(x)
        if self.quant_conv is not None:
            h = self.quant_conv(h)
        mean, logvar = jnp.split(h.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        if z.ndim != 4 or z.shape[-1] != self.config.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: expected latents [B, h, w, {self.config.latent_channels}], "
                             f"got shape {tuple(z.shape)}")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        mean, _ = self.encode(x)
        return self.decode(mean)

    def init_params(self, key: jax.Array, image_size: int | None = None) -> dict:
        """Random float32 params (traced on a ``[1, s, s, in_channels]`` image; ``s`` defaults to the smallest
        valid size ``latent_factor``). Shapes do not depend on ``s``."""
        s = self.config.latent_factor if image_size is None else int(image_size)
        return self.init(key, jnp.zeros((1, s, s, self.config.in_channels), jnp.float32))["params"]


def sample_latent(key: jax.Array, mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """Draw ``z = mean + exp(logvar / 2) * eps`` from the posterior returned by ``encode`` (unscaled)."""
    return mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
