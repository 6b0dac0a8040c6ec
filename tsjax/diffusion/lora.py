"""LoRA for the Flax UNet: a separate parameter tree merged functionally, PEFT/diffusers file interop.

LoRA tree (a plain pytree, so optax can train it alone)::

    {"down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_q": {"down": [in, r], "up": [r, out]}, ...}

Keys are the "/"-joined Flax module paths of the adapted layers (torch ``a.b.0.c`` -> ``a/b_0/c``). For a
Dense layer ``down`` is ``[in, r]`` and ``up`` ``[r, out]``; for a Conv layer (kernel HWIO
``[kh, kw, in, out]``) ``down`` is ``[kh, kw, in, r]`` (PEFT's ``lora_A`` conv) and ``up`` ``[r, out]``
(``lora_B``, a 1x1 conv). The merged kernel is ``W + scale * tensordot(down, up)``.

PEFT's ``lora_alpha / r`` factor is folded into ``up`` when a file is loaded; trees made by
:func:`init_lora` use ``alpha = r`` (factor 1), which is what :func:`save_lora_diffusers` records, so a
saved tree loads in diffusers (``unet.load_lora_adapter(path, prefix="unet")`` /
``pipe.load_lora_weights``) computing the same function. Biases are not adapted.
"""
from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Iterable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["DEFAULT_TARGETS", "TARGET_GROUPS", "lora_targets", "init_lora", "merge_lora", "lora_mask",
           "lora_to_peft_state_dict", "lora_from_state_dict", "save_lora_diffusers", "load_lora_diffusers",
           "LORA_WEIGHT_NAME"]

LORA_WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DEFAULT_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
# Named groups accepted in ``targets`` (expanded to module-path suffixes).
TARGET_GROUPS = {
    "attn": DEFAULT_TARGETS,
    "ff": ("ff/net_0/proj", "ff/net_2"),
    "proj": ("proj_in", "proj_out"),
    "conv": ("conv1", "conv2"),  # resnet convolutions
}


def _expand(targets: Iterable[str] | None) -> tuple[str, ...]:
    if targets is None:
        return DEFAULT_TARGETS
    if isinstance(targets, str):
        targets = (targets,)
    out: list[str] = []
    for t in targets:
        if t in TARGET_GROUPS:
            out.extend(TARGET_GROUPS[t])
        else:  # torch-style "ff.net.0.proj" / "to_out.0" -> Flax "ff/net_0/proj" / "to_out_0"
            from tsjax.diffusion.convert import flax_path

            out.append("/".join(flax_path(t.replace("/", "."))))
    return tuple(dict.fromkeys(out))


def lora_targets(unet_params: Mapping, targets: Iterable[str] | None = None) -> dict[str, tuple[int, ...]]:
    """The adapted layers: ``{module path: kernel shape}`` for every Dense/Conv kernel whose module path ends
    with one of ``targets`` (on "/" boundaries).

    ``targets``: None (attention q/k/v/out: :data:`DEFAULT_TARGETS`), or names such as ``"to_q"``,
    ``"to_out.0"``, ``"ff/net_2"``, ``"conv1"``, or the groups of :data:`TARGET_GROUPS` (``"attn"``,
    ``"ff"``, ``"proj"``, ``"conv"``). Raises ``ValueError`` when nothing matches.
    """
    suffixes = _expand(targets)
    found = {}
    for path, v in traverse_util.flatten_dict(dict(unet_params)).items():
        if path[-1] != "kernel" or len(v.shape) not in (2, 4):
            continue
        mod = "/".join(path[:-1])
        if any(mod == s or mod.endswith("/" + s) for s in suffixes):
            found[mod] = tuple(v.shape)
    if not found:
        raise ValueError(f"LoRA targets {list(suffixes)} match no Dense/Conv layer of the UNet params")
    return found


def init_lora(key: jax.Array, unet_params: Mapping, rank: int, targets: Iterable[str] | None = None) -> dict:
    """New LoRA factors: ``down ~ N(0, (1/rank)^2)`` (PEFT ``init_lora_weights="gaussian"``), ``up = 0``,
    so the merged model equals the base model at initialisation. float32.

    ``unet_params``: the UNet params tree (arrays or ``ShapeDtypeStruct``); ``rank`` >= 1; ``targets`` as in
    :func:`lora_targets`. Returns ``{module path: {"down": [..., in, rank], "up": [rank, out]}}``.
    """
    if not isinstance(rank, (int, np.integer)) or rank < 1:
        raise ValueError(f"LoRA rank must be a positive integer, got {rank!r}")
    layers = sorted(lora_targets(unet_params, targets).items())
    down_shapes = [tuple(shape[:-1]) + (rank,) for _, shape in layers]
    sizes = [math.prod(sh) for sh in down_shapes]
    z = jax.random.normal(key, (sum(sizes),), jnp.float32) / rank  # one draw, sliced per layer
    if not isinstance(z, jax.core.Tracer):
        z = np.asarray(z)  # host slicing: no per-shape compilation when called eagerly
    out, a = {}, 0
    for (mod, shape), sh, n in zip(layers, down_shapes, sizes):
        out[mod] = {"down": jnp.asarray(z[a:a + n].reshape(sh)),
                    "up": jnp.asarray(np.zeros((rank, shape[-1]), np.float32))}
        a += n
    return out


def merge_lora(unet_params: Mapping, lora_params: Mapping, scale: float | jax.Array = 1.0) -> dict:
    """``W + scale * down @ up`` for every LoRA entry (pure; jit/grad friendly; other leaves shared).

    The delta is computed in float32 and cast to each kernel's dtype. Raises ``ValueError`` for a LoRA
    entry whose module path or shape does not exist in ``unet_params``.
    """
    flat = dict(traverse_util.flatten_dict(dict(unet_params)))
    for mod, f in lora_params.items():
        path = tuple(mod.split("/")) + ("kernel",)
        if path not in flat:
            raise ValueError(f"LoRA layer {mod!r} is not a Dense/Conv layer of the UNet params")
        w = flat[path]
        delta = jnp.tensordot(f["down"].astype(jnp.float32), f["up"].astype(jnp.float32), axes=1)
        if delta.shape != w.shape:
            raise ValueError(f"LoRA layer {mod!r}: delta shape {delta.shape} != kernel shape {w.shape}")
        flat[path] = (w.astype(jnp.float32) + scale * delta).astype(w.dtype)
    return traverse_util.unflatten_dict(flat)


def lora_mask(params: Any, *, include_camera: bool = False) -> Any:
    """Boolean pytree for ``optax.masked`` / ``optax.multi_transform`` over a combined params dict.

    True for leaves under a top-level ``"lora"`` key (and, with ``include_camera``, any leaf whose path
    contains a ``camera`` module, i.e. the camera embedding); False elsewhere.
    """
    def mark(path, _):
        names = [getattr(p, "key", getattr(p, "name", str(p))) for p in path]
        names = [str(n) for n in names]
        return bool(names and names[0] == "lora") or (include_camera and any("camera" in n for n in names))

    return jax.tree_util.tree_map_with_path(mark, params)


# ---------------------------------------------------------------------------------------------------------
# PEFT / diffusers files
# ---------------------------------------------------------------------------------------------------------
def _torch_module(mod: str) -> str:
    from tsjax.diffusion.convert import torch_key

    return torch_key(tuple(mod.split("/")))


def lora_to_peft_state_dict(lora_params: Mapping, prefix: str = "unet") -> dict[str, np.ndarray]:
    """PEFT-named float32 numpy tensors: ``{prefix}.{module}.lora_A.weight`` ``[r, in]`` (conv:
    ``[r, in, kh, kw]``) and ``lora_B.weight`` ``[out, r]`` (conv: ``[out, r, 1, 1]``)."""
    out = {}
    pre = f"{prefix}." if prefix else ""
    for mod, f in lora_params.items():
        down, up = np.asarray(f["down"], np.float32), np.asarray(f["up"], np.float32)
        name = pre + _torch_module(mod)
        if down.ndim == 2:
            a, b = down.T, up.T
        else:  # [kh, kw, in, r] -> [r, in, kh, kw]; [r, out] -> [out, r, 1, 1]
            a, b = down.transpose(3, 2, 0, 1), up.T[:, :, None, None]
        out[f"{name}.lora_A.weight"] = np.ascontiguousarray(a)
        out[f"{name}.lora_B.weight"] = np.ascontiguousarray(b)
    return out


def save_lora_diffusers(path: str | os.PathLike, lora_params: Mapping) -> Path:
    """Write ``lora_params`` as diffusers/PEFT LoRA weights (safetensors, alpha = rank).

    ``path``: a folder (the file is ``pytorch_lora_weights.safetensors`` inside it, created if needed) or a
    ``.safetensors`` file name. Returns the file written. Loads in diffusers with
    ``pipe.load_lora_weights(folder)`` or ``unet.load_lora_adapter(file, prefix="unet")``.
    """
    from safetensors.numpy import save_file

    p = Path(path)
    if p.suffix != ".safetensors":
        p.mkdir(parents=True, exist_ok=True)
        p = p / LORA_WEIGHT_NAME
    else:
        p.parent.mkdir(parents=True, exist_ok=True)
    sd = lora_to_peft_state_dict(lora_params)
    ranks = {int(np.shape(f["up"])[0]) for f in lora_params.values()}
    meta = {"format": "pt"}
    if len(ranks) == 1:
        r = ranks.pop()
        cfg = {"unet.r": r, "unet.lora_alpha": r, "unet.rank_pattern": {}, "unet.alpha_pattern": {},
               "unet.target_modules": sorted(_torch_module(m) for m in lora_params), "unet.use_dora": False,
               "unet.lora_bias": False}
        meta["lora_adapter_metadata"] = json.dumps(cfg, indent=2, sort_keys=True)
    save_file(sd, str(p), metadata=meta)
    return p


_PEFT = re.compile(r"^(?P<mod>.+)\.lora_(?P<ab>[AB])(?:\.default(?:_\d+)?)?\.weight$")
_OLD = re.compile(r"^(?P<mod>.+?)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora\.(?P<ud>down|up)\.weight$")
_OLD2 = re.compile(r"^(?P<mod>.+)\.lora\.(?P<ud>down|up)\.weight$")  # LoRACompatibleLinear/Conv (diffusers<0.25)


def _alpha_module(name: str) -> str:
    """Module name of an alpha entry: ``unet.X.alpha``, ``X.processor.to_q_lora.alpha`` (-> ``X.to_q``), ..."""
    name = name.removeprefix("unet.").removesuffix(".alpha").removesuffix(".down.weight")
    if m := re.match(r"^(?P<mod>.+?)\.processor\.(?P<proj>to_q|to_k|to_v|to_out)_lora$", name):
        return f"{m['mod']}.{'to_out.0' if m['proj'] == 'to_out' else m['proj']}"
    return name.removesuffix(".lora")


def _peft_alpha(meta: dict, module: str, r: int) -> float:
    for pat, a in (meta.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pat})$", module):
            return float(a)
    return float(meta.get("lora_alpha", r))


def lora_from_state_dict(state_dict: Mapping[str, Any], unet_params: Mapping, *, source: str = "LoRA weights",
                         network_alphas: Mapping[str, float] | None = None, metadata: dict | None = None) -> dict:
    """Parse a LoRA state dict (PEFT ``lora_A/lora_B`` or old diffusers ``processor.to_q_lora.down``
    naming, optional ``unet.`` prefix, optional ``<module>.alpha`` / ``...to_q_lora.alpha`` entries or
    ``network_alphas`` keyed by module or by the ``down`` tensor's name) into a LoRA tree for
    ``unet_params``; ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA metadata) is folded into ``up``.

    ``metadata``: PEFT ``LoraConfig`` kwargs (``lora_alpha``, ``alpha_pattern``, ``use_rslora``; keys may be
    ``unet.``-prefixed as diffusers stores them). Raises ``ValueError`` for text-encoder entries, unknown
    keys, layers missing from the UNet, or shape mismatches (naming the tensor and both shapes).
    """
    meta = {k.removeprefix("unet."): v for k, v in (metadata or {}).items()
            if k.startswith("unet.") or "." not in k}
    alphas = {_alpha_module(k): float(v) for k, v in (network_alphas or {}).items()}
    pairs: dict[str, dict[str, np.ndarray]] = {}
    bad_te, unknown = [], []
    for key, v in state_dict.items():
        k = key
        if k.startswith(("text_encoder.", "text_encoder_2.", "lora_te")):
            bad_te.append(key)
            continue
        k = k.removeprefix("unet.")
        w = np.asarray(v.detach().cpu().float().numpy() if hasattr(v, "detach") else v, np.float32)
        if k.endswith(".alpha"):
            alphas[_alpha_module(k)] = float(np.asarray(w).reshape(()))
            continue
        if m := _PEFT.match(k):
            mod, part = m["mod"], "A" if m["ab"] == "A" else "B"
        elif m := _OLD.match(k):
            proj = "to_out.0" if m["proj"] == "to_out" else m["proj"]
            mod, part = f"{m['mod']}.{proj}", "A" if m["ud"] == "down" else "B"
        elif m := _OLD2.match(k):
            mod, part = m["mod"], "A" if m["ud"] == "down" else "B"
        else:
            unknown.append(key)
            continue
        pairs.setdefault(mod, {})[part] = w
    if bad_te:
        raise ValueError(f"{source}: text-encoder LoRA is not supported ({len(bad_te)} tensors, e.g. {bad_te[0]})")
    if unknown:
        raise ValueError(f"{source}: {len(unknown)} unrecognised LoRA tensor(s): {', '.join(unknown[:5])}")
    if not pairs:
        raise ValueError(f"{source}: no LoRA tensors found")

    from tsjax.diffusion.convert import flax_path

    flat = traverse_util.flatten_dict(dict(unet_params))
    out = {}
    for mod, ab in sorted(pairs.items()):
        if set(ab) != {"A", "B"}:
            raise ValueError(f"{source}: LoRA layer {mod!r} lacks its {'lora_B' if 'A' in ab else 'lora_A'} tensor")
        fmod = "/".join(flax_path(mod))
        kpath = tuple(fmod.split("/")) + ("kernel",)
        if kpath not in flat:
            raise ValueError(f"{source}: LoRA layer {mod!r} has no Dense/Conv kernel in the UNet params")
        kshape = tuple(flat[kpath].shape)
        a, b = ab["A"], ab["B"]
        r = a.shape[0]
        if len(kshape) == 2:
            down = (a[:, :, 0, 0] if a.ndim == 4 else a).T
            up = (b[:, :, 0, 0] if b.ndim == 4 else b).T
        else:
            if a.ndim != 4 or b.ndim != 4:
                raise ValueError(f"{source}: LoRA layer {mod!r} targets a conv but has tensors of shapes "
                                 f"{a.shape} / {b.shape} (expected 4-D)")
            down, up = a.transpose(2, 3, 1, 0), b[:, :, 0, 0].T
        expect_down = kshape[:-1] + (r,)
        if down.shape != expect_down or up.shape != (r, kshape[-1]):
            raise ValueError(f"{source}: LoRA layer {mod!r} has lora_A {a.shape} / lora_B {b.shape}, incompatible "
                             f"with the kernel {kshape} (expected lora_A [r, {kshape[-2]}...] and lora_B "
                             f"[{kshape[-1]}, r])")
        alpha = alphas.get(mod, _peft_alpha(meta, mod, r))
        factor = alpha / (np.sqrt(r) if meta.get("use_rslora") else r)
        out[fmod] = {"down": jnp.asarray(down, jnp.float32), "up": jnp.asarray(up * factor, jnp.float32)}
    return out


def load_lora_diffusers(path: str | os.PathLike, unet_params: Mapping) -> dict:
    """Load LoRA weights saved by diffusers / PEFT (or :func:`save_lora_diffusers`) for ``unet_params``.

    ``path``: a ``.safetensors`` / ``.bin`` file, or a folder holding ``pytorch_lora_weights.safetensors``
    (or ``.bin``, or a single ``*.safetensors``). The ``lora_adapter_metadata`` (PEFT config with
    ``lora_alpha``) stored by diffusers is honoured. Returns a LoRA tree (see module docstring).
    """
    from tsjax.diffusion.convert import read_state_dict

    p = Path(path).expanduser()
    if p.is_dir():
        cands = [p / LORA_WEIGHT_NAME, p / "pytorch_lora_weights.bin"]
        found = [c for c in cands if c.is_file()] or sorted(p.glob("*.safetensors"))
        if len(found) < 1:
            raise FileNotFoundError(f"{p}: no {LORA_WEIGHT_NAME} (nor pytorch_lora_weights.bin, nor a .safetensors)")
        p = found[0]
    elif not p.is_file():
        raise FileNotFoundError(f"{p}: no such LoRA weights file")
    sd = read_state_dict(p)
    metadata = None
    if p.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(p), framework="numpy") as f:
            raw = (f.metadata() or {}).get("lora_adapter_metadata")
        if raw:
            metadata = json.loads(raw)
    return lora_from_state_dict(sd, unet_params, source=str(p), metadata=metadata)
