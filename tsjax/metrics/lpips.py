"""LPIPS (VGG variant) in JAX, weight-compatible with the ``lpips`` package (Zhang et al. 2018).

    d(x, y) = sum_l mean_{h,w} sum_c w_lc * (f̂_l(x) - f̂_l(y))^2_{hwc}

with f_l the VGG16 ReLU outputs relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the inputs after the
``lpips`` scaling layer ((x - shift) / scale on [-1, 1] images), f̂ = f / (||f||_C + 1e-10) unit-
normalised along channels, and w_l the non-negative 1x1 "lin" weights.

Weights come from two local files: a torchvision VGG16 state dict (``vgg16-*.pth`` or
``.safetensors``, keys ``features.N.weight``) and the lpips linear layers (``vgg.pth`` with keys
``lin{l}.model.1.weight`` of shape [1, C_l, 1, 1]). Nothing is downloaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tsjax.metrics.vgg import VGG, convert_vgg_state_dict, read_state_dict

LPIPS_TAPS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
LPIPS_CHANNELS = (64, 128, 256, 512, 512)
# lpips.pretrained_networks ScalingLayer constants (for inputs in [-1, 1]).
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)


def load_lpips_lin(path: str | Path) -> list[jax.Array]:
    """Read the lpips linear layers: returns 5 arrays [C_l] (``lin{l}.model.1.weight`` squeezed)."""
    sd = read_state_dict(path)
    out = []
    for l, c in enumerate(LPIPS_CHANNELS):
        key = f"lin{l}.model.1.weight"
        if key not in sd:
            raise ValueError(f"{path}: missing key {key!r} (expected an lpips 'vgg.pth' linear-layer file)")
        w = np.asarray(sd[key], np.float32)
        if w.size != c:
            raise ValueError(f"{path}: {key} has shape {w.shape}, expected (1, {c}, 1, 1)")
        out.append(jnp.asarray(w.reshape(c)))
    return out


def _unit(f: jax.Array, eps: float = 1e-10) -> jax.Array:
    return f / (jnp.sqrt(jnp.sum(f * f, axis=-1, keepdims=True)) + eps)


def lpips_from_features(fx: dict, fy: dict, lin: list[jax.Array]) -> jax.Array:
    """LPIPS from precomputed VGG16 taps (dicts of [B,h,w,C]); returns [B] float32."""
    total = 0.0
    for tap, w in zip(LPIPS_TAPS, lin):
        diff = (_unit(fx[tap]) - _unit(fy[tap])) ** 2
        total = total + jnp.mean(jnp.einsum("bhwc,c->bhw", diff, w), axis=(1, 2))
    return total


@dataclass(frozen=True)
class LPIPS:
    """LPIPS-VGG with loaded weights. ``__call__(x, y) -> [B]``.

    ``x``, ``y``: [B, H, W, 3] (or [H, W, 3]) sRGB float32 in [0, 1] (mapped to [-1, 1] as
    ``lpips(..., normalize=True)`` does). H, W >= 16 (five VGG blocks, four poolings). Distances are
    >= 0 and 0 for identical images.
    """

    vgg_params: dict
    lin: tuple

    def features(self, x: jax.Array) -> dict:
        x = jnp.asarray(x, jnp.float32)
        if x.ndim == 3:
            x = x[None]
        x = 2.0 * x - 1.0
        x = (x - jnp.asarray(LPIPS_SHIFT)) / jnp.asarray(LPIPS_SCALE)
        return VGG(arch="vgg16", taps=LPIPS_TAPS, normalize=False).apply(self.vgg_params, x)

    def __call__(self, x: jax.Array, y: jax.Array) -> jax.Array:
        return _lpips_jit(self.vgg_params, tuple(self.lin), x, y)


@jax.jit
def _lpips_jit(vgg_params, lin, x, y):
    m = LPIPS(vgg_params, lin)
    return lpips_from_features(m.features(x), m.features(y), list(lin))


def _vgg16_from_lpips_state(sd: dict) -> dict | None:
    """Map a full ``lpips.LPIPS`` state dict (``net.slice{s}.{N}.weight``) to ``features.N`` keys."""
    out = {}
    for k, v in sd.items():
        parts = k.split(".")
        if len(parts) == 4 and parts[0] == "net" and parts[1].startswith("slice"):
            out[f"features.{parts[2]}.{parts[3]}"] = v
    return out or None


def lpips_file_has_backbone(path: str | Path) -> bool:
    """True when ``path`` is a full ``lpips.LPIPS`` state dict (holds the VGG16 backbone too)."""
    return _vgg16_from_lpips_state(read_state_dict(path)) is not None


def load_lpips(lin_path: str | Path, vgg16_path: str | Path | None = None) -> LPIPS:
    """Load LPIPS-VGG weights from local files.

    Args:
      lin_path: the lpips linear layers (``vgg.pth``, keys ``lin{l}.model.1.weight``), or a full
        ``lpips.LPIPS`` state dict that also holds the backbone as ``net.slice{s}.{N}.weight``.
      vgg16_path: torchvision VGG16 ``features`` weights; needed unless ``lin_path`` holds the backbone.
    """
    lin = tuple(load_lpips_lin(lin_path))
    if vgg16_path is not None:
        sd, src = read_state_dict(vgg16_path), str(vgg16_path)
    else:
        sd, src = _vgg16_from_lpips_state(read_state_dict(lin_path)), str(lin_path)
        if sd is None:
            raise ValueError(f"{lin_path}: holds only the LPIPS linear layers; pass the torchvision "
                             "VGG16 weights as well (vgg16_path / --vgg16)")
    variables = convert_vgg_state_dict(sd, "vgg16", source=src, layers=13)
    return LPIPS(variables, lin)
