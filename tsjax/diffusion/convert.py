"""Load diffusers / transformers PyTorch checkpoints from local folders into Flax params (never the network).

Layout understood (a diffusers Stable Diffusion folder, or a local Hugging Face cache snapshot of one,
``.../models--org--name/snapshots/<hash>/``; the ``models--org--name`` folder itself is accepted too)::

    model_index.json
    unet/          config.json + diffusion_pytorch_model.safetensors   (or .bin, or sharded *.index.json)
    vae/           config.json + diffusion_pytorch_model.safetensors
    text_encoder/  config.json + model.safetensors                     (or pytorch_model.bin)
    tokenizer/     vocab.json, merges.txt, ...
    scheduler/     scheduler_config.json

Conversion is **template driven**: the Flax module is traced with :func:`jax.eval_shape` (no memory), and
every PyTorch tensor ``a.b.0.c.weight`` is placed at the Flax path ``("a", "b_0", "c", leaf)`` where the
leaf is whatever the template has at that module: ``kernel`` (Linear ``[out, in]`` -> ``[in, out]``;
Conv2d OIHW -> HWIO; a 1x1 Conv2d feeding a Linear template is squeezed), ``scale`` (norm weight) or
``embedding`` (``nn.Embed``); ``bias`` stays ``bias``. Shapes are checked; a wrong shape, an unexpected
tensor or a missing parameter raises :class:`ValueError` naming the file, the tensor and the expected
shape. Buffers that are not parameters (``position_ids``, ...) are ignored.

Own parameters are saved/loaded with orbax by :func:`tsjax.diffusion.io.save_params` / ``load_params``
(model folders: :func:`tsjax.diffusion.sampling.save_model` / ``load_model``).
"""
from __future__ import annotations

import dataclasses
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

__all__ = ["StableDiffusion", "read_state_dict", "find_weights", "resolve_model_dir", "state_dict_to_flax",
           "load_unet", "load_vae", "load_text_encoder", "load_pipeline", "flax_path", "torch_key"]

# Weight file stems in preference order (diffusers models, then transformers models).
_STEMS = ("diffusion_pytorch_model", "model", "pytorch_model")
# Non-parameter buffers some checkpoints carry.
_IGNORED_SUFFIXES = ("position_ids", "num_batches_tracked")
# Deprecated diffusers attention names (pre-0.14 VAE mid-block attention) -> current names.
_LEGACY_RENAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}

_ST_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_}


# ---------------------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------------------
def resolve_model_dir(path: str | os.PathLike) -> Path:
    """A local model folder, resolving a Hugging Face cache repo folder ``models--org--name`` to its snapshot.

    The snapshot is ``refs/main``'s commit when present, else the only snapshot. Raises
    ``FileNotFoundError`` naming the path when it does not exist.
    """
    p = Path(path).expanduser()
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such model folder or file")
    snaps = p / "snapshots"
    if p.is_dir() and snaps.is_dir():
        ref = p / "refs" / "main"
        if ref.is_file() and (snaps / ref.read_text().strip()).is_dir():
            return snaps / ref.read_text().strip()
        cands = sorted(d for d in snaps.iterdir() if d.is_dir())
        if len(cands) != 1:
            raise FileNotFoundError(f"{snaps}: expected one snapshot (or refs/main), found {len(cands)}")
        return cands[0]
    return p


def find_weights(folder: str | os.PathLike) -> Path:
    """The weight file of one component folder: safetensors preferred, then ``.bin``; a sharded
    checkpoint is returned as its ``*.index.json``; an ``fp16``-style variant only when nothing else exists.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder}: no such folder")
    for ext in ("safetensors", "bin"):
        for stem in _STEMS:
            for name in (f"{stem}.{ext}", f"{stem}.{ext}.index.json"):
                if (folder / name).is_file():
                    return folder / name
    for ext in ("safetensors", "bin"):
        for stem in _STEMS:
            found = sorted(folder.glob(f"{stem}.*.{ext}")) + sorted(folder.glob(f"{stem}.*.{ext}.index.json"))
            if found:
                return found[0]
    raise FileNotFoundError(f"{folder}: no weight file (expected one of "
                            f"{', '.join(s + '.safetensors' for s in _STEMS)} or .bin)")


def _read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """Minimal safetensors reader (memory-mapped; bf16 through ``ml_dtypes``; no torch needed)."""
    import ml_dtypes

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: not a safetensors file (truncated header)")
        (n,) = struct.unpack("<Q", head)
        try:
            header = json.loads(f.read(n))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path}: not a safetensors file ({e})") from None
    data = np.memmap(path, dtype=np.uint8, mode="r", offset=8 + n)
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        dt = info["dtype"]
        npdt = ml_dtypes.bfloat16 if dt == "BF16" else _ST_DTYPES.get(dt)
        if npdt is None:
            raise ValueError(f"{path}: tensor {key!r} has unsupported dtype {dt}")
        a, b = info["data_offsets"]
        out[key] = np.frombuffer(data[a:b], dtype=npdt).reshape(info["shape"])
    return out


def _read_bin(path: Path) -> dict[str, np.ndarray]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a test dependency here
        raise ValueError(f"{path}: reading PyTorch .bin checkpoints needs torch; convert it to safetensors") from None
    sd = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
        sd = sd["state_dict"]
    out = {}
    for k, v in sd.items():
        if not hasattr(v, "detach"):
            continue
        v = v.detach()
        out[k] = (v.float() if v.dtype == torch.bfloat16 else v).numpy()
    return out


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read a PyTorch state dict as numpy arrays (float tensors keep their stored dtype, bf16 as ``ml_dtypes``).

    ``path``: a ``.safetensors`` / ``.bin`` file, a sharded checkpoint's ``*.index.json``, or a component
    folder (see :func:`find_weights`; a HF cache repo folder is resolved to its snapshot).
    """
    p = resolve_model_dir(path)
    if p.is_dir():
        p = find_weights(p)
    name = p.name
    if name.endswith(".index.json"):
        try:
            wmap = json.loads(p.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise ValueError(f"{p}: not a sharded-checkpoint index ({e})") from None
        out: dict[str, np.ndarray] = {}
        for shard in sorted(set(wmap.values())):
            sp = p.parent / shard
            if not sp.is_file():
                raise FileNotFoundError(f"{sp}: shard listed in {p} is missing")
            out.update(read_state_dict(sp))
        return out
    if name.endswith(".safetensors"):
        return _read_safetensors(p)
    if name.endswith((".bin", ".pt", ".pth", ".ckpt")):
        return _read_bin(p)
    raise ValueError(f"{p}: unknown weight file type (expected .safetensors or .bin)")


# ---------------------------------------------------------------------------------------------------------
# Names
# ---------------------------------------------------------------------------------------------------------
def flax_path(torch_module: str) -> tuple[str, ...]:
    """``"down_blocks.0.attentions.1.to_out.0"`` -> ``("down_blocks_0", "attentions_1", "to_out_0")``."""
    out: list[str] = []
    for part in torch_module.split("."):
        if part.isdigit() and out:
            out[-1] = f"{out[-1]}_{part}"
        else:
            out.append(part)
    return tuple(out)


# torch ``ModuleList`` / ``Sequential`` attribute names of the SD modules (diffusers, transformers CLIP).
# ``name_<i>`` is split back into ``name.<i>`` only for these: ``linear_1`` is a plain attribute.
LIST_NAMES = frozenset({"down_blocks", "up_blocks", "attentions", "resnets", "transformer_blocks",
                        "downsamplers", "upsamplers", "to_out", "net", "layers"})


def torch_key(path: tuple[str, ...]) -> str:
    """Inverse of :func:`flax_path` for module paths: ``("to_out_0",)`` -> ``"to_out.0"``,
    ``("time_embedding", "linear_1")`` -> ``"time_embedding.linear_1"`` (see :data:`LIST_NAMES`)."""
    parts = []
    for p in path:
        head, sep, tail = p.rpartition("_")
        parts.extend([head, tail] if sep and tail.isdigit() and head in LIST_NAMES else [p])
    return ".".join(parts)


def _torch_shape(leaf: str, flax_shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(flax_shape) == 2:
        return flax_shape[::-1]
    if leaf == "kernel" and len(flax_shape) == 4:  # HWIO -> OIHW
        return (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1])
    return tuple(flax_shape)


def _to_flax(leaf: str, w: np.ndarray, flax_shape: tuple[int, ...]) -> np.ndarray | None:
    """Convert one tensor to the template's layout, or None when the shapes are incompatible."""
    if leaf == "kernel":
        if w.ndim == 4 and len(flax_shape) == 2 and w.shape[2:] == (1, 1):
            w = w[:, :, 0, 0]  # 1x1 conv stored for a Linear (legacy attention)
        if w.ndim == 2 and len(flax_shape) == 4 and flax_shape[:2] == (1, 1):
            w = w[:, :, None, None]  # Linear stored for a 1x1 conv
        if w.ndim == 2:
            w = w.T
        elif w.ndim == 4:
            w = w.transpose(2, 3, 1, 0)
    return w if tuple(w.shape) == tuple(flax_shape) else None


def _fmt(names: list[str], limit: int = 5) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def state_dict_to_flax(state_dict: Mapping[str, Any], template_params: Mapping, *, source: str = "state dict",
                       dtype: Any = jnp.float32, renames: Mapping[str, str] | None = None) -> dict:
    """Map a PyTorch state dict onto a Flax params tree shaped like ``template_params``.

    Args:
      state_dict: ``{torch key: array}`` (numpy, torch or jax arrays).
      template_params: nested dict of arrays or ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``);
        only its paths and shapes are used.
      source: file name used in error messages.
      dtype: dtype of the returned arrays (float32 default; ``jnp.bfloat16`` for a bf16 copy).
      renames: ``{torch module prefix: replacement}`` applied to keys first (e.g. diffusers'
        ``class_embedding`` -> tsjax's ``camera_embedding``).
    Returns a nested dict of ``jnp`` arrays with exactly the template's paths.
    Raises ``ValueError`` on a shape mismatch (naming the tensor, found and expected torch shapes),
    unexpected tensors or parameters left without a tensor.
    """
    flat_t = traverse_util.flatten_dict(dict(template_params))
    modules: dict[tuple[str, ...], dict[str, tuple[int, ...]]] = {}
    for path, v in flat_t.items():
        modules.setdefault(tuple(path[:-1]), {})[path[-1]] = tuple(v.shape)
    tops = {p[0] for p in flat_t}

    keys = [k for k in state_dict if not k.split(".")[-1] in _IGNORED_SUFFIXES]
    # A wrapper prefix absent from the template (e.g. "text_model." when the template starts below it).
    first = {k.split(".", 1)[0] for k in keys}
    prefix = ""
    if len(first) == 1 and next(iter(first)) not in tops and all("." in k for k in keys):
        prefix = next(iter(first)) + "."

    out: dict[tuple[str, ...], Any] = {}
    unexpected: list[str] = []
    for key in keys:
        name = key[len(prefix):]
        for a, b in (renames or {}).items():
            if name == a or name.startswith(a + "."):
                name = b + name[len(a):]
                break
        mod, _, tleaf = name.rpartition(".")
        parts = mod.split(".")
        if parts[-1] in _LEGACY_RENAMES:
            parts = parts[:-1] + _LEGACY_RENAMES[parts[-1]].split(".")
        mpath = flax_path(".".join(parts))
        leaves = modules.get(mpath)
        if leaves is None:
            unexpected.append(key)
            continue
        if tleaf == "bias":
            cand = ["bias"]
        elif tleaf == "weight":
            cand = [c for c in ("kernel", "scale", "embedding") if c in leaves]
        else:
            cand = [tleaf]
        cand = [c for c in cand if c in leaves]
        if not cand:
            unexpected.append(key)
            continue
        leaf = cand[0]
        w = np.asarray(state_dict[key].detach().cpu().float().numpy() if hasattr(state_dict[key], "detach")
                       else state_dict[key])
        fshape = leaves[leaf]
        conv = _to_flax(leaf, w, fshape)
        if conv is None:
            raise ValueError(f"{source}: tensor {key!r} has shape {tuple(w.shape)}, expected "
                             f"{_torch_shape(leaf, fshape)} (Flax {'/'.join(mpath + (leaf,))} {fshape})")
        out[mpath + (leaf,)] = conv
    missing = ["/".join(p) for p in flat_t if p not in out]
    if unexpected:
        raise ValueError(f"{source}: {len(unexpected)} unexpected tensor(s) not in the Flax model: {_fmt(unexpected)}")
    if missing:
        raise ValueError(f"{source}: {len(missing)} parameter(s) missing from the checkpoint: {_fmt(missing)}")
    return traverse_util.unflatten_dict({k: jnp.asarray(np.asarray(v, np.float32), dtype) for k, v in out.items()})


# ---------------------------------------------------------------------------------------------------------
# Components
# ---------------------------------------------------------------------------------------------------------
def _component_dir(path: str | os.PathLike, sub: str, cfg_name: str = "config.json") -> Path:
    """``path`` itself when it holds ``cfg_name``, else ``path/sub`` (a pipeline root)."""
    p = resolve_model_dir(path)
    if (p / cfg_name).is_file():
        return p
    if (p / sub / cfg_name).is_file():
        return p / sub
    raise FileNotFoundError(f"{p}: no {cfg_name} (nor {sub}/{cfg_name}); expected a diffusers {sub} folder")


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON ({e})") from None


def _template(module, *args) -> dict:
    """Parameter shapes of ``module``: its ``param_shapes()``, else ``eval_shape`` of ``init_params(key)``,
    else of ``init(key, *args)``."""
    key = jax.random.key(0)
    if hasattr(module, "param_shapes"):
        return module.param_shapes()
    if hasattr(module, "init_params"):
        shapes = jax.eval_shape(lambda k: module.init_params(k), key)
    else:
        shapes = jax.eval_shape(lambda k: module.init(k, *args), key)
    return shapes["params"] if "params" in shapes else shapes


def _load_component(folder: Path, template: dict, dtype, renames=None) -> dict:
    wfile = find_weights(folder)
    return state_dict_to_flax(read_state_dict(wfile), template, source=str(wfile), dtype=dtype, renames=renames)


def load_unet(path: str | os.PathLike, *, dtype: Any = jnp.float32):
    """Load a diffusers ``UNet2DConditionModel`` folder (or a pipeline root's ``unet/``).

    Returns ``(UNetConfig, params)``; params are ``dtype`` (float32 default) and fit
    ``UNet2DConditionModel(config).apply({'params': params}, ...)``. diffusers' projection
    ``class_embedding`` becomes the ``camera_embedding`` module.
    """
    from tsjax.diffusion.unet import UNet2DConditionModel, UNetConfig

    folder = _component_dir(path, "unet")
    cfg = UNetConfig.from_diffusers(_read_json(folder / "config.json"), source=str(folder / "config.json"))
    model = UNet2DConditionModel(cfg)
    tpl = model.param_shapes(batch=1, seq_len=8)
    return cfg, _load_component(folder, tpl, dtype, renames={"class_embedding": "camera_embedding"})


def load_vae(path: str | os.PathLike, *, dtype: Any = jnp.float32):
    """Load a diffusers ``AutoencoderKL`` folder (or a pipeline root's ``vae/``): ``(VAEConfig, params)``."""
    from tsjax.diffusion.vae import AutoencoderKL, VAEConfig

    folder = _component_dir(path, "vae")
    cfg = VAEConfig.from_diffusers(_read_json(folder / "config.json"), source=str(folder / "config.json"))
    model = AutoencoderKL(cfg)
    size = 8 * 2 ** max(len(getattr(cfg, "block_out_channels", (1,))) - 1, 0)
    tpl = _template(model, jnp.zeros((1, size, size, getattr(cfg, "in_channels", 3)), jnp.float32))
    return cfg, _load_component(folder, tpl, dtype)


def load_text_encoder(path: str | os.PathLike, *, dtype: Any = jnp.float32):
    """Load a transformers ``CLIPTextModel`` folder (or a pipeline root's ``text_encoder/``):
    ``(CLIPTextConfig, params)``."""
    from tsjax.diffusion.clip_text import CLIPTextConfig, CLIPTextModel

    folder = _component_dir(path, "text_encoder")
    cfg = CLIPTextConfig.from_transformers(_read_json(folder / "config.json"), source=str(folder / "config.json"))
    model = CLIPTextModel(cfg)
    n = getattr(cfg, "max_position_embeddings", 77)
    tpl = _template(model, jnp.zeros((1, n), jnp.int32))
    return cfg, _load_component(folder, tpl, dtype)


@dataclasses.dataclass(frozen=True)
class StableDiffusion:
    """A converted Stable Diffusion folder.

    ``params``: ``{"unet": ..., "vae": ..., "text_encoder": ...}`` Flax param trees; ``tokenizer``: a
    transformers ``CLIPTokenizer`` (local files); ``scheduler_config``: the raw diffusers scheduler dict
    (``prediction_type`` "epsilon" / "v_prediction", betas, ...); ``source``: the resolved folder.
    """

    unet_config: Any
    vae_config: Any
    text_encoder_config: Any
    params: dict
    tokenizer: Any
    scheduler_config: dict
    source: str = ""


def load_pipeline(path: str | os.PathLike, *, dtype: Any = jnp.float32) -> StableDiffusion:
    """Load a local diffusers Stable Diffusion folder (or HF cache snapshot) into a :class:`StableDiffusion`.

    Needs ``unet/``, ``vae/``, ``text_encoder/``, ``tokenizer/`` and ``scheduler/scheduler_config.json``;
    a missing part raises ``FileNotFoundError`` naming it.
    """
    root = resolve_model_dir(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder (expected a diffusers Stable Diffusion folder)")
    for sub, f in (("unet", "config.json"), ("vae", "config.json"), ("text_encoder", "config.json"),
                   ("scheduler", "scheduler_config.json")):
        if not (root / sub / f).is_file():
            raise FileNotFoundError(f"{root / sub / f}: missing (expected a diffusers Stable Diffusion folder)")
    if not (root / "tokenizer").is_dir():
        raise FileNotFoundError(f"{root / 'tokenizer'}: missing tokenizer folder")
    from tsjax.diffusion.clip_text import load_tokenizer

    ucfg, up = load_unet(root / "unet", dtype=dtype)
    vcfg, vp = load_vae(root / "vae", dtype=dtype)
    tcfg, tp = load_text_encoder(root / "text_encoder", dtype=dtype)
    sched = _read_json(root / "scheduler" / "scheduler_config.json")
    return StableDiffusion(ucfg, vcfg, tcfg, {"unet": up, "vae": vp, "text_encoder": tp},
                           load_tokenizer(str(root / "tokenizer")), sched, str(root))
