"""The one place that loads tsjax's compiled kernels and registers their XLA FFI targets.

Libraries are built by ``csrc/build.py`` (``make build`` / ``pip install --no-build-isolation -e .``)
into ``tsjax/_lib``: ``libtsjax_cpu.so`` (always) and ``libtsjax_cuda.so`` (when nvcc was found).
"""
from __future__ import annotations

import ctypes
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

LIB_DIR = Path(__file__).resolve().parents[1] / "_lib"
_TARGET = "tsjax_rasterize"


@functools.cache
def _load() -> dict[str, bool]:
    """Load the libraries present and register their targets; returns {platform: registered}."""
    done = {}
    for platform, name, sym in (("cpu", "libtsjax_cpu.so", "TsjaxRasterizeCpu"),
                                ("CUDA", "libtsjax_cuda.so", "TsjaxRasterizeCuda")):
        path = LIB_DIR / name
        if not path.exists():
            continue
        if platform == "CUDA":
            try:
                has_gpu = bool(jax.devices("gpu"))
            except RuntimeError:  # CPU-only jaxlib: nothing to register the CUDA kernel for
                has_gpu = False
            if not has_gpu:
                continue
        lib = ctypes.cdll.LoadLibrary(str(path))
        if not hasattr(lib, sym):
            continue
        jax.ffi.register_ffi_target(_TARGET, jax.ffi.pycapsule(getattr(lib, sym)), platform=platform)
        done[platform.lower()] = True
    return done


def available(platform: str | None = None) -> bool:
    """True when the rasterizer kernel is compiled and registered for ``platform`` (default: the
    default backend's platform)."""
    platform = (platform or jax.default_backend()).lower()
    platform = "cuda" if platform == "gpu" else platform
    return _load().get(platform, False)


def rasterize_ids(pos_clip, tris, h: int, w: int):
    """FFI kernel call: per-pixel triangle id + 1 [B,H,W] int32 and the kernel's own (u, v, z/w)
    [B,H,W,3] float32 (used for parity tests; the differentiable values are recomputed in JAX)."""
    if not available():
        raise RuntimeError(
            f"tsjax rasterizer kernel not built for platform '{jax.default_backend()}' (looked in {LIB_DIR}); "
            "run `make build` or `python csrc/build.py`, or use backend='ref'")
    b = pos_clip.shape[0]
    out_types = (jax.ShapeDtypeStruct((b, h, w), jnp.int32), jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32))
    call = jax.ffi.ffi_call(_TARGET, out_types, vmap_method="sequential")
    return call(pos_clip.astype(jnp.float32), tris.astype(jnp.int32))
