"""Flax CLIP text encoder (transformers ``CLIPTextModel``) and the local-files CLIP tokenizer.

The module mirrors transformers' ``CLIPTextTransformer`` (token + learned position embeddings, pre-LayerNorm
transformer layers with a causal self-attention mask, final LayerNorm) with identical sub-module names below
``text_model.`` (``embeddings/token_embedding``, ``encoder/layers_0/self_attn/q_proj``, ``final_layer_norm``),
so ``tsjax.diffusion.convert.load_text_encoder`` maps a transformers state dict onto it and outputs agree
with PyTorch to float32 round-off.

``pooled`` output as transformers 4.x: the final-normed hidden state at the first ``eos_token_id`` of each
sequence, or, for legacy configs with ``eos_token_id == 2``, at the position of the largest token id (the
end-of-text token is the largest id of the original CLIP vocabulary).
"""
from __future__ import annotations

import dataclasses
import math
import os
from pathlib import Path
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from tsjax.diffusion.layers import LayerNorm, attention, config_from_dict, dense

__all__ = ["CLIPTextConfig", "CLIPTextModel", "CLIPEncoder", "load_tokenizer", "HIDDEN_ACTS"]

HIDDEN_ACTS = ("quick_gelu", "gelu", "gelu_new", "gelu_pytorch_tanh")

# Keys of a transformers config.json with no effect on the forward function (training, generation,
# bookkeeping). Anything else that is not a CLIPTextConfig field is rejected.
_IGNORED = {
    "architectures", "model_type", "transformers_version", "torch_dtype", "dtype", "attention_dropout", "dropout",
    "initializer_range", "initializer_factor", "projection_dim", "add_cross_attention", "bad_words_ids",
    "begin_suppress_tokens", "chunk_size_feed_forward", "cross_attention_hidden_size", "decoder_start_token_id",
    "diversity_penalty", "do_sample", "early_stopping", "encoder_no_repeat_ngram_size",
    "exponential_decay_length_penalty", "finetuning_task", "forced_bos_token_id", "forced_eos_token_id",
    "id2label", "label2id", "is_decoder", "is_encoder_decoder", "length_penalty", "max_length", "min_length",
    "no_repeat_ngram_size", "num_beam_groups", "num_beams", "num_return_sequences", "output_attentions",
    "output_hidden_states", "output_scores", "prefix", "problem_type", "remove_invalid_values",
    "repetition_penalty", "return_dict", "return_dict_in_generate", "sep_token_id", "suppress_tokens",
    "task_specific_params", "temperature", "tf_legacy_loss", "tie_encoder_decoder", "tie_word_embeddings",
    "tokenizer_class", "top_k", "top_p", "torchscript", "typical_p", "use_bfloat16", "gradient_checkpointing",
    "attn_implementation",
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class CLIPTextConfig:
    """Architecture of :class:`CLIPTextModel`; field names are transformers' ``CLIPTextConfig`` keys.

    Defaults are OpenAI CLIP ViT-B's text tower. SD 1.x uses ViT-L/14 (hidden 768, 12 layers, 12 heads,
    ``quick_gelu``); SD 2.x uses OpenCLIP ViT-H (hidden 1024, 23 layers, 16 heads, ``gelu``).
    ``hidden_act``: ``"quick_gelu"`` (``x * sigmoid(1.702 x)``), ``"gelu"`` (exact erf GELU) or
    ``"gelu_new"`` / ``"gelu_pytorch_tanh"`` (tanh approximation).
    ``eos_token_id`` selects the pooled position (see the module docstring); ``bos``/``pad`` ids are kept
    for round trips only.
    """

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    pad_token_id: int = 1
    bos_token_id: int = 49406
    eos_token_id: int = 49407

    def __post_init__(self):
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"CLIPTextConfig: hidden_act={self.hidden_act!r} is not supported "
                             f"(supported: {HIDDEN_ACTS})")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"CLIPTextConfig: hidden_size={self.hidden_size} is not divisible by "
                             f"num_attention_heads={self.num_attention_heads}")

    @classmethod
    def from_transformers(cls, cfg: dict, *, source: str = "config") -> "CLIPTextConfig":
        """Build from a transformers ``text_encoder/config.json`` dict (a ``CLIPTextModel`` config).

        Raises ``ValueError`` naming ``source`` for a full ``CLIPConfig`` (``text_config`` nested), an
        unsupported ``hidden_act``, pruned heads or an unknown key; metadata/training keys are ignored.
        """
        cfg = dict(cfg)
        if "text_config" in cfg or cfg.get("model_type") == "clip":
            raise ValueError(f"{source}: this is a full CLIPConfig (text + vision); expected a CLIPTextModel "
                             f"config (model_type 'clip_text_model')")
        if cfg.pop("pruned_heads", None):
            raise ValueError(f"{source}: pruned attention heads are not supported")
        return config_from_dict(cls, cfg, source=source, what="CLIPTextModel", ignored=_IGNORED)

    def to_transformers(self) -> dict:
        """The transformers ``CLIPTextConfig`` kwargs computing the same function."""
        return dataclasses.asdict(self)

    @classmethod
    def tiny(cls, **overrides) -> "CLIPTextConfig":
        """A small text encoder for CPU runs: hidden 32 (= ``UNetConfig.tiny().cross_attention_dim``), 2 layers,
        4 heads, MLP 64, 77 positions, ``gelu``; vocabulary 514 with bos 512 / eos (= pad) 513, matching
        :func:`tsjax.diffusion.sampling.tiny_tokenizer`."""
        base = dict(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                    max_position_embeddings=77, hidden_act="gelu", pad_token_id=513, bos_token_id=512,
                    eos_token_id=513)
        base.update(overrides)
        return cls(**base)

    @classmethod
    def sd2(cls, **overrides) -> "CLIPTextConfig":
        """The Stable Diffusion 2.x text encoder (OpenCLIP ViT-H/14 text tower, 23 layers, 340M params)."""
        base = dict(vocab_size=49408, hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                    num_attention_heads=16, max_position_embeddings=77, hidden_act="gelu", pad_token_id=1,
                    bos_token_id=0, eos_token_id=2)
        base.update(overrides)
        return cls(**base)


def _act(name: str, x):
    if name == "quick_gelu":
        return x * jax.nn.sigmoid(1.702 * x)
    if name in ("gelu_new", "gelu_pytorch_tanh"):
        return jax.nn.gelu(x, approximate=True)
    return jax.nn.gelu(x, approximate=False)


class _SelfAttention(nn.Module):
    """``CLIPAttention``: biased q/k/v/out projections, causal (text) or full (vision) attention and an
    optional key-padding mask. ``[B,L,D]``."""

    heads: int
    impl: str
    dtype: Any
    causal: bool = True

    @nn.compact
    def __call__(self, x, keep=None):
        b, n, d = x.shape
        hd = d // self.heads
        q = dense(d, "q_proj", self.dtype)(x).reshape(b, n, self.heads, hd)
        k = dense(d, "k_proj", self.dtype)(x).reshape(b, n, self.heads, hd)
        v = dense(d, "v_proj", self.dtype)(x).reshape(b, n, self.heads, hd)
        if keep is None:
            o = attention(q, k, v, impl=self.impl, is_causal=self.causal)
        else:  # (causal AND) key-padding mask; a row with no visible key gets uniform weights (finite)
            logits = jnp.einsum("bnhd,bmhd->bhnm", q, k).astype(jnp.float32) / math.sqrt(hd)
            vis = jnp.tril(jnp.ones((n, n), bool)) if self.causal else jnp.ones((n, n), bool)
            mask = vis[None, None] & keep[:, None, None, :]
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
            o = jnp.einsum("bhnm,bmhd->bnhd", jax.nn.softmax(logits, axis=-1).astype(v.dtype), v)
        return dense(d, "out_proj", self.dtype)(o.reshape(b, n, d))


class _MLP(nn.Module):
    intermediate: int
    act: str
    dtype: Any

    @nn.compact
    def __call__(self, x):
        h = _act(self.act, dense(self.intermediate, "fc1", self.dtype)(x))
        return dense(x.shape[-1], "fc2", self.dtype)(h)


class _EncoderLayer(nn.Module):
    cfg: Any
    impl: str
    dtype: Any
    causal: bool = True

    @nn.compact
    def __call__(self, x, keep=None):
        c, dt = self.cfg, self.dtype
        x = x + _SelfAttention(c.num_attention_heads, self.impl, dt, self.causal, name="self_attn")(
            LayerNorm(c.layer_norm_eps, "layer_norm1", dt)(x), keep)
        return x + _MLP(c.intermediate_size, c.hidden_act, dt, name="mlp")(LayerNorm(c.layer_norm_eps, "layer_norm2",
                                                                                    dt)(x))


class CLIPEncoder(nn.Module):
    """transformers ``CLIPEncoder``: ``num_hidden_layers`` pre-LN layers (``layer_norm1`` -> self-attention
    -> residual, ``layer_norm2`` -> MLP ``fc1``/act/``fc2`` -> residual), params ``layers_{i}/...``.

    ``cfg``: any config with ``num_hidden_layers``, ``num_attention_heads``, ``intermediate_size``,
    ``hidden_act`` (one of :data:`HIDDEN_ACTS`) and ``layer_norm_eps`` (the text tower's
    :class:`CLIPTextConfig`, or a vision tower's config). ``causal``: causal self-attention (text tower) or
    full attention (vision tower). ``apply(x [B, N, D], keep [B, N] bool | None) -> [B, N, D]``.
    """

    cfg: Any
    impl: str = "auto"
    dtype: Any = jnp.float32
    causal: bool = True

    @nn.compact
    def __call__(self, x, keep=None):
        for i in range(self.cfg.num_hidden_layers):
            x = _EncoderLayer(self.cfg, self.impl, self.dtype, self.causal, name=f"layers_{i}")(x, keep)
        return x


class _Embeddings(nn.Module):
    cfg: CLIPTextConfig
    dtype: Any

    @nn.compact
    def __call__(self, ids):
        c = self.cfg
        tok = nn.Embed(c.vocab_size, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32, name="token_embedding")
        pos = nn.Embed(c.max_position_embeddings, c.hidden_size, dtype=self.dtype, param_dtype=jnp.float32,
                       name="position_embedding")
        return tok(ids) + pos(jnp.arange(ids.shape[1]))[None]


class CLIPTextModel(nn.Module):
    """CLIP text transformer (transformers ``CLIPTextModel``, without projection).

    ``apply({'params': p}, input_ids, attention_mask=None) -> (last_hidden_state, pooled)``:

    * ``input_ids`` ``[B, L]`` int, ``L <= max_position_embeddings`` (Stable Diffusion pads to 77);
    * ``attention_mask`` optional ``[B, L]`` (1 = token, 0 = padding; Stable Diffusion passes none);
    * ``last_hidden_state`` ``[B, L, hidden_size]`` after the final LayerNorm (the UNet's context);
    * ``pooled`` ``[B, hidden_size]`` (see the module docstring).

    Outputs are in the compute ``dtype`` (params stay float32, LayerNorm statistics float32).
    ``attention_impl`` as :func:`tsjax.diffusion.layers.attention` (used when no ``attention_mask`` is given).
    """

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    attention_impl: str = "auto"

    @nn.compact
    def __call__(self, input_ids, attention_mask=None):
        c, dt = self.config, self.dtype
        if input_ids.ndim != 2 or input_ids.shape[1] > c.max_position_embeddings:
            raise ValueError(f"CLIPTextModel: input_ids must be [B, L] with L <= {c.max_position_embeddings}, "
                             f"got shape {tuple(input_ids.shape)}")
        input_ids = input_ids.astype(jnp.int32)
        keep = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)
        x = _Embeddings(c, dt, name="embeddings")(input_ids)
        x = CLIPEncoder(c, self.attention_impl, dt, name="encoder")(x, keep)
        x = LayerNorm(c.layer_norm_eps, "final_layer_norm", dt)(x)
        if c.eos_token_id == 2:  # legacy configs: the end-of-text token has the largest id
            pos = jnp.argmax(input_ids, axis=-1)
        else:
            pos = jnp.argmax((input_ids == c.eos_token_id).astype(jnp.int32), axis=-1)
        pooled = jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]
        return x, pooled

    def init_params(self, key: jax.Array, seq_len: int | None = None) -> dict:
        """Random float32 params (traced on ``[1, seq_len]`` ids; default ``max_position_embeddings``)."""
        n = self.config.max_position_embeddings if seq_len is None else int(seq_len)
        return self.init(key, jnp.zeros((1, n), jnp.int32))["params"]


def load_tokenizer(path: str | os.PathLike):
    """A transformers ``CLIPTokenizer`` from a local folder (``vocab.json`` + ``merges.txt``, optionally
    ``tokenizer_config.json`` / ``special_tokens_map.json``); never touches the network.

    Raises ``FileNotFoundError`` naming the folder (or the missing file) when it is absent.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{p}: no such tokenizer folder (expected vocab.json and merges.txt)")
    for f in ("vocab.json", "merges.txt"):
        if not (p / f).is_file():
            raise FileNotFoundError(f"{p / f}: missing tokenizer file (expected vocab.json and merges.txt in {p})")
    from transformers import CLIPTokenizer

    return CLIPTokenizer.from_pretrained(str(p), local_files_only=True)
