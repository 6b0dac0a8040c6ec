"""VGG feature extractors (torchvision weight layout) and the contextual loss.

The networks mirror ``torchvision.models.vgg16`` / ``vgg19`` ``features`` (3x3 convolutions with
padding 1, ReLU, 2x2 max-pooling) in Flax linen, NHWC. Layers are named ``conv{block}_{i}`` and the
ReLU outputs that can be tapped are named ``relu{block}_{i}`` (e.g. ``relu3_4`` in VGG19, ``relu3_3`` in
VGG16), the names used in the style-transfer / contextual-loss literature.

Weights are read from a local torchvision state dict (``vgg19-*.pth``/``vgg16-*.pth``, read with
``torch.load(weights_only=True)``) or a ``.safetensors`` file with the same keys
(``features.N.weight`` [O, I, 3, 3], ``features.N.bias`` [O]); nothing is ever downloaded.

``contextual_loss`` / ``contextual_similarity`` implement Mechrez et al., "The Contextual Loss for
Image Transformation with Non-Aligned Data" (ECCV 2018); they are pure, jittable, differentiable and
batched, and serve both the stage-2 contextual loss and the theme-consistency metric.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# torchvision cfgs: numbers are conv output channels, "M" a 2x2 max-pool.
VGG_CFGS: dict[str, tuple] = {
    "vgg16": (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"),
    "vgg19": (64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M", 512, 512, 512, 512, "M",
              512, 512, 512, 512, "M"),
}


def conv_layout(arch: str) -> list[tuple[str, int, int]]:
    """``[(name, torchvision features index, out_channels)]`` of every conv of ``arch``.

    torchvision's ``features`` Sequential holds Conv2d, ReLU (and MaxPool2d after each block), so the
    conv indices are 0, 2, 5, 7, 10, ... ; ``name`` is ``conv{block}_{i}`` (1-based).
    """
    if arch not in VGG_CFGS:
        raise ValueError(f"unknown VGG architecture {arch!r}; expected one of {sorted(VGG_CFGS)}")
    out, idx, block, i = [], 0, 1, 1
    for v in VGG_CFGS[arch]:
        if v == "M":
            idx += 1
            block, i = block + 1, 1
        else:
            out.append((f"conv{block}_{i}", idx, int(v)))
            idx += 2
            i += 1
    return out


class VGG(nn.Module):
    """VGG ``features`` trunk returning the requested ReLU taps.

    Attributes:
      arch: "vgg16" or "vgg19".
      taps: names of ReLU outputs to return (e.g. ``("relu3_4",)``); the network stops after the
        deepest requested tap.
      normalize: if True the input is sRGB in [0, 1] and is normalised with the ImageNet mean/std
        (torchvision's convention); if False the input is used as is (callers such as LPIPS apply
        their own scaling).

    ``__call__(x [B, H, W, 3] float32) -> {tap: [B, h, w, C] float32}``, h = H / 2**(block-1).
    """

    arch: str = "vgg19"
    taps: tuple[str, ...] = ("relu1_2", "relu2_2", "relu3_4", "relu4_4", "relu5_4")
    normalize: bool = True

    @nn.compact
    def __call__(self, x: jax.Array) -> dict[str, jax.Array]:
        layout = conv_layout(self.arch)
        known = {"relu" + n[4:] for n, _, _ in layout}
        bad = [t for t in self.taps if t not in known]
        if bad:
            raise ValueError(f"unknown {self.arch} taps {bad}; valid: {sorted(known)}")
        x = jnp.asarray(x, jnp.float32)
        if self.normalize:
            x = (x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD)
        order = [n for n, _, _ in layout]
        last = max(order.index("conv" + t[4:]) for t in self.taps)
        feats: dict[str, jax.Array] = {}
        block = 1
        for name, _, ch in layout[: last + 1]:
            b = int(name[4:].split("_")[0])
            if b != block:
                x = nn.max_pool(x, (2, 2), strides=(2, 2))
                block = b
            x = nn.relu(nn.Conv(ch, (3, 3), padding=((1, 1), (1, 1)), name=name)(x))
            if "relu" + name[4:] in self.taps:
                feats["relu" + name[4:]] = x
        return feats


def read_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """Read a PyTorch ``.pth``/``.pt``/``.bin`` state dict or a ``.safetensors`` file into numpy.

    Raises FileNotFoundError when ``path`` is missing and ValueError when it is not a state dict.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.numpy import load_file

        return {k: np.asarray(v, np.float32) for k, v in load_file(str(path)).items()}
    import torch  # local import: only needed for pickled checkpoints

    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping):
        raise ValueError(f"{path}: expected a state dict (mapping of tensors), got {type(sd).__name__}")
    return {k: v.detach().float().numpy() for k, v in sd.items() if hasattr(v, "detach")}


def convert_vgg_state_dict(sd: Mapping[str, np.ndarray], arch: str = "vgg19", *,
                           prefix: str = "features.", source: str = "state dict",
                           layers: int | None = None) -> dict:
    """torchvision ``features.N.{weight,bias}`` -> Flax params ``{convB_I: {kernel [3,3,I,O], bias}}``.

    Only the first ``layers`` convolutions are converted (all when None). A missing convolution raises
    ValueError naming the key; extra keys (the classifier) are ignored.
    """
    params = {}
    for name, idx, ch in conv_layout(arch)[:layers]:
        kw, kb = f"{prefix}{idx}.weight", f"{prefix}{idx}.bias"
        for k in (kw, kb):
            if k not in sd:
                raise ValueError(f"{source}: missing key {k!r} for {arch} layer {name}")
        w = np.asarray(sd[kw], np.float32)
        if w.shape[0] != ch or w.shape[2:] != (3, 3):
            raise ValueError(f"{source}: {kw} has shape {w.shape}, expected ({ch}, C, 3, 3)")
        params[name] = {"kernel": jnp.asarray(w.transpose(2, 3, 1, 0)),
                        "bias": jnp.asarray(np.asarray(sd[kb], np.float32))}
    return {"params": params}


def load_vgg(path: str | Path, arch: str = "vgg19", taps: Sequence[str] = ("relu3_4",),
             normalize: bool = True) -> tuple[VGG, dict]:
    """Build ``VGG(arch, taps)`` and load its variables from a torchvision-format file at ``path``.

    Returns ``(module, variables)``; call ``module.apply(variables, images)``. The convolutions up to
    the deepest tap are read (a torchvision checkpoint holds them all).
    """
    module = VGG(arch=arch, taps=tuple(taps), normalize=normalize)
    order = [n for n, _, _ in conv_layout(arch)]
    bad = [t for t in taps if "conv" + t[4:] not in order]
    if bad or not taps:
        raise ValueError(f"unknown {arch} taps {list(taps)}")
    last = max(order.index("conv" + t[4:]) for t in taps)
    variables = convert_vgg_state_dict(read_state_dict(path), arch, source=str(path), layers=last + 1)
    return module, variables


# ----------------------------------------------------------------------------------------------------
# Contextual loss (Mechrez et al. 2018)


def _flatten(f: jax.Array) -> jax.Array:
    f = jnp.asarray(f, jnp.float32)
    if f.ndim == 3:
        f = f[None]
    if f.ndim != 4:
        raise ValueError(f"contextual features must be [B,H,W,C] or [H,W,C], got shape {f.shape}")
    return f.reshape(f.shape[0], -1, f.shape[-1])


def _unit(v: jax.Array) -> jax.Array:
    """Unit-normalise the last axis; zero vectors stay zero with finite (zero-norm-safe) gradients."""
    return v * jax.lax.rsqrt(jnp.maximum(jnp.sum(v * v, axis=-1, keepdims=True), 1e-24))


def contextual_similarity(fx: jax.Array, fy: jax.Array, h: float = 0.5, eps: float = 1e-5) -> jax.Array:
    """Contextual similarity CX(X, Y) per batch element, in (0, 1].

    Args:
      fx: features of the generated images [B, Hx, Wx, C] (or [Hx, Wx, C]).
      fy: features of the target images [B, Hy, Wy, C]; spatial sizes may differ from ``fx``.
      h: bandwidth of the exponential kernel.
      eps: stabiliser of the relative normalisation.

    Following the paper and its reference code: both feature sets are centred by the mean target
    feature (per batch element, over Hy*Wy), unit-normalised along C; d_ij = 1 - cos(x_i, y_j);
    relative distances d~_ij = d_ij / (min_k d_ik + eps); w_ij = exp((1 - d~_ij) / h); each row i is
    normalised over the targets j (CX_ij = w_ij / sum_k w_ik); CX = mean_j max_i CX_ij (for every
    target feature, its best-matching generated feature). Invariant to spatial permutations of either
    input. Memory is O(B * Hx*Wx * Hy*Wy).

    Returns: [B] float32.
    """
    x, y = _flatten(fx), _flatten(fy)
    if x.shape[0] != y.shape[0] or x.shape[-1] != y.shape[-1]:
        raise ValueError(f"contextual features disagree: fx {fx.shape} vs fy {fy.shape} (batch, channels)")
    mu = jnp.mean(y, axis=1, keepdims=True)
    x, y = x - mu, y - mu
    x, y = _unit(x), _unit(y)
    d = 1.0 - jnp.einsum("bic,bjc->bij", x, y)  # [B, Nx, Ny]
    d_rel = d / (jnp.min(d, axis=2, keepdims=True) + eps)
    # exp((1 - d~)/h) normalised over j == softmax over j of (-d~/h): numerically safe form.
    cx = jax.nn.softmax(-d_rel / h, axis=2)
    return jnp.mean(jnp.max(cx, axis=1), axis=1)


def contextual_loss(fx: jax.Array, fy: jax.Array, h: float = 0.5, eps: float = 1e-5) -> jax.Array:
    """Contextual loss ``-log(CX(fx, fy) + eps)`` per batch element: [B] float32, >= -log(1 + eps).

    See ``contextual_similarity`` for shapes and the definition. Lower = the generated features
    contain a close match for every target feature. Jittable and differentiable w.r.t. both inputs.
    """
    return -jnp.log(contextual_similarity(fx, fy, h, eps) + eps)


def image_contextual_loss(module: VGG, variables: dict, x: jax.Array, y: jax.Array, *,
                          tap: str = "relu3_4", h: float = 0.5, eps: float = 1e-5) -> jax.Array:
    """Contextual loss between images through one VGG tap: [B] float32.

    ``x`` (generated) and ``y`` (target) are sRGB [B, H, W, 3] in [0, 1]; ``module`` must tap ``tap``
    (e.g. ``load_vgg(path, "vgg19", ("relu3_4",))``). Gradients flow to ``x`` (and ``y``; wrap it in
    ``jax.lax.stop_gradient`` for a fixed target). The relu3_4 map is H/4 x W/4, so memory grows as
    (H*W/16)^2 per pair: 256 px -> 4096^2 similarity entries (64 MiB float32) per image pair.
    """
    return contextual_loss(module.apply(variables, x)[tap], module.apply(variables, y)[tap], h, eps)
