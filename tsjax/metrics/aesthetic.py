"""LAION aesthetic predictor heads on L2-normalised CLIP ViT-L/14 image embeddings.

Two public heads are supported, read from a local PyTorch/safetensors state dict:

- the linear head ``sa_0_4_vit_l_14_linear.pth``: ``Linear(768, 1)`` (keys ``weight`` [1, 768], ``bias``);
- the "improved aesthetic predictor" MLP (``sac+logos+ava1-l14-linearMSE.pth``): Linear layers
  768-1024-128-64-16-1 stored as ``layers.{0,2,4,6,7}.{weight,bias}`` with Dropout in between and no
  non-linearity (as in the published model), so at inference it is a chain of affine maps.

Scores are on the LAION 1-10 scale. The embedding must come from CLIP's ``visual_projection`` and be
L2-normalised (``tsjax.metrics.clip.CLIP.image_embeds``); the head's input size is read from the file.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.metrics.vgg import read_state_dict


@dataclass(frozen=True)
class AestheticHead:
    """Chain of affine layers ``[(W [out, in], b [out]), ...]``; ``__call__(emb [B, D]) -> [B]``."""

    layers: tuple
    kind: str  # "linear" | "mlp"

    @property
    def in_dim(self) -> int:
        return int(self.layers[0][0].shape[1])

    def __call__(self, embeds: jax.Array, *, normalize: bool = True) -> jax.Array:
        x = jnp.asarray(embeds, jnp.float32)
        if x.ndim != 2 or x.shape[1] != self.in_dim:
            raise ValueError(f"aesthetic head expects embeddings [B, {self.in_dim}], got {x.shape} "
                             "(use a CLIP ViT-L/14 image embedding)")
        if normalize:
            x = x / jnp.linalg.norm(x, axis=-1, keepdims=True)
        for w, b in self.layers:
            x = x @ w.T + b
        return x[:, 0]


def load_aesthetic_head(path: str | Path) -> AestheticHead:
    """Read a LAION aesthetic head (linear or improved MLP) from ``path`` (.pth or .safetensors)."""
    sd = read_state_dict(path)
    if "weight" in sd and "bias" in sd:
        layers = [(sd["weight"], sd["bias"])]
        kind = "linear"
    else:
        idx = sorted({int(m.group(1)) for k in sd if (m := re.fullmatch(r"layers\.(\d+)\.weight", k))})
        if not idx:
            raise ValueError(f"{path}: not a LAION aesthetic head (expected 'weight'/'bias' or 'layers.N.weight')")
        layers = []
        for i in idx:
            if f"layers.{i}.bias" not in sd:
                raise ValueError(f"{path}: missing key 'layers.{i}.bias'")
            layers.append((sd[f"layers.{i}.weight"], sd[f"layers.{i}.bias"]))
        kind = "mlp"
    out = []
    for j, (w, b) in enumerate(layers):
        w, b = np.asarray(w, np.float32), np.asarray(b, np.float32).reshape(-1)
        if w.ndim != 2 or w.shape[0] != b.shape[0] or (j and w.shape[1] != out[-1][0].shape[0]):
            raise ValueError(f"{path}: layer {j} has inconsistent shapes {w.shape}, {b.shape}")
        out.append((jnp.asarray(w), jnp.asarray(b)))
    if out[-1][0].shape[0] != 1:
        raise ValueError(f"{path}: the last layer must output 1 score, got {out[-1][0].shape[0]}")
    return AestheticHead(tuple(out), kind)
