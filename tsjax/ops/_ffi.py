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
_IDS_TARGET = "tsjax_rasterize_ids"  # ids only (CPU); other platforms slice the full call
# extra CPU-only targets of libtsjax_cpu.so: (FFI target name, exported symbol)
_ROWS_TARGETS = ("tsjax_gather_rows", "tsjax_scatter_add_rows")
_CONV_TARGETS = ("tsjax_conv_forward", "tsjax_conv_kernel_grad")
_CONV_BF16_TARGET = "tsjax_conv_forward_bf16"
_CONV_WINOGRAD_TARGET = "tsjax_conv_forward_winograd"
_GROUP_NORM_TARGETS = ("tsjax_group_norm_forward", "tsjax_group_norm_backward")
_ATTENTION_TARGETS = ("tsjax_attention_forward", "tsjax_attention_backward")
_LAYER_NORM_TARGETS = ("tsjax_layer_norm_forward", "tsjax_layer_norm_backward")
_GEGLU_TARGETS = ("tsjax_geglu_forward", "tsjax_geglu_backward")
_CPU_EXTRA = ((_ROWS_TARGETS[0], "TsjaxGatherRowsCpu"), (_ROWS_TARGETS[1], "TsjaxScatterAddRowsCpu"),
              (_IDS_TARGET, "TsjaxRasterizeIdsCpu"), (_CONV_TARGETS[0], "TsjaxConvForwardCpu"),
              (_CONV_TARGETS[1], "TsjaxConvKernelGradCpu"), (_ATTENTION_TARGETS[0], "TsjaxAttentionForwardCpu"),
              (_ATTENTION_TARGETS[1], "TsjaxAttentionBackwardCpu"), (_CONV_BF16_TARGET, "TsjaxConvForwardBf16Cpu"),
              (_CONV_WINOGRAD_TARGET, "TsjaxConvForwardWinogradCpu"),
              (_GROUP_NORM_TARGETS[0], "TsjaxGroupNormForwardCpu"), (_GROUP_NORM_TARGETS[1], "TsjaxGroupNormBackwardCpu"),
              (_LAYER_NORM_TARGETS[0], "TsjaxLayerNormForwardCpu"), (_LAYER_NORM_TARGETS[1], "TsjaxLayerNormBackwardCpu"),
              (_GEGLU_TARGETS[0], "TsjaxGegluForwardCpu"), (_GEGLU_TARGETS[1], "TsjaxGegluBackwardCpu"))


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
        if platform == "cpu":
            for target, extra in _CPU_EXTRA:
                if hasattr(lib, extra):
                    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(lib, extra)), platform="cpu")
                    done[target] = True
            if hasattr(lib, "TsjaxCpuIsa"):
                done["cpu_isa"] = int(lib.TsjaxCpuIsa())
            if hasattr(lib, "TsjaxCpuAmxBf16"):
                done["cpu_amx_bf16"] = bool(lib.TsjaxCpuAmxBf16())
    return done


def rows_available() -> bool:
    """True when the CPU row gather / scatter-add kernels are registered and the default backend is
    the CPU (other platforms use XLA's own gather / scatter)."""
    return jax.default_backend() == "cpu" and all(_load().get(t, False) for t in _ROWS_TARGETS)


def cpu_isa() -> int:
    """Instruction set of the native CPU convolution, attention and GroupNorm kernels: 0 = not available (library not
    built, or a CPU without AVX2+FMA), 1 = AVX2+FMA (8 floats a vector), 2 = AVX-512F (16)
    (``TSJAX_CPU_ISA=avx2`` when the library is loaded caps it at 1)."""
    done = _load()
    targets = _CONV_TARGETS + _ATTENTION_TARGETS + _GROUP_NORM_TARGETS
    return done.get("cpu_isa", 0) if all(done.get(t, False) for t in targets) else 0


def targets_registered(*targets: str) -> bool:
    """True when every named CPU FFI target is registered (its symbol is in the loaded library)."""
    done = _load()
    return all(done.get(t, False) for t in targets)


def cpu_vector_width() -> int:
    """Floats per vector of the native CPU kernels' instruction set (:func:`cpu_isa`): 16 with AVX-512F, 8
    with AVX2+FMA, 0 when they are not available. Attention head dims and GroupNorm channel counts must be
    multiples of it."""
    return {0: 0, 1: 8}.get(cpu_isa(), 16)


def cpu_amx_bf16() -> bool:
    """True when the bfloat16 convolution on Intel AMX tiles is built and usable: a CPU with AMX-BF16 and
    AVX512-BF16 whose OS granted the tile state (``TSJAX_CPU_ISA=avx2|avx512`` when the library is loaded
    turns it off)."""
    done = _load()
    return cpu_isa() > 0 and done.get(_CONV_BF16_TARGET, False) and done.get("cpu_amx_bf16", False)


def available(platform: str | None = None) -> bool:
    """True when the rasterizer kernel is compiled and registered for ``platform`` (default: the
    default backend's platform)."""
    platform = (platform or jax.default_backend()).lower()
    platform = "cuda" if platform == "gpu" else platform
    return _load().get(platform, False)


def gather_rows(table, idx):
    """Native row gather: table [Bt, R, C] float32, idx [B, N] int32 (Bt in {1, B}) -> [B, N, C]
    with zero rows for indices outside [0, R). Call only when :func:`rows_available`."""
    b, n = idx.shape
    out = jax.ShapeDtypeStruct((b, n, table.shape[2]), jnp.float32)
    return jax.ffi.ffi_call("tsjax_gather_rows", out, vmap_method="sequential")(table, idx)


def scatter_add_rows(values, idx, out_batch: int, rows: int):
    """Native deterministic scatter-add: values [B, N, C] float32, idx [B, N] int32 -> [Bo, R, C]
    (Bo = out_batch in {1, B}; Bo = 1 sums all batches), indices outside [0, R) dropped."""
    out = jax.ShapeDtypeStruct((out_batch, rows, values.shape[2]), jnp.float32)
    return jax.ffi.ffi_call("tsjax_scatter_add_rows", out, vmap_method="sequential")(values, idx)


def _check_available():
    if not available():
        raise RuntimeError(
            f"tsjax rasterizer kernel not built for platform '{jax.default_backend()}' (looked in {LIB_DIR}); "
            "run `make build` or `python csrc/build.py`, or use backend='ref'")


def rasterize_ids_only(pos_clip, tris, h: int, w: int):
    """FFI kernel call without barycentrics: per-pixel triangle id + 1 [B,H,W] int32 (0 = empty),
    identical to ``rasterize_ids(...)[0]``. On the CPU the kernel then skips all barycentric work and
    the [B,H,W,3] output (what :func:`tsjax.ops.rasterize` uses: it recomputes (u, v, z/w) in JAX);
    elsewhere it is the full call, sliced."""
    _check_available()
    if jax.default_backend() != "cpu" or not _load().get(_IDS_TARGET, False):
        return rasterize_ids(pos_clip, tris, h, w)[0]
    out = jax.ShapeDtypeStruct((pos_clip.shape[0], h, w), jnp.int32)
    call = jax.ffi.ffi_call(_IDS_TARGET, out, vmap_method="sequential")
    return call(pos_clip.astype(jnp.float32), tris.astype(jnp.int32))


def rasterize_ids(pos_clip, tris, h: int, w: int):
    """FFI kernel call: per-pixel triangle id + 1 [B,H,W] int32 and the kernel's own (u, v, z/w)
    [B,H,W,3] float32 (used for parity tests; the differentiable values are recomputed in JAX)."""
    _check_available()
    b = pos_clip.shape[0]
    out_types = (jax.ShapeDtypeStruct((b, h, w), jnp.int32), jax.ShapeDtypeStruct((b, h, w, 3), jnp.float32))
    call = jax.ffi.ffi_call(_TARGET, out_types, vmap_method="sequential")
    return call(pos_clip.astype(jnp.float32), tris.astype(jnp.int32))
