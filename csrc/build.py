"""Build tsjax's native kernels (XLA FFI custom calls) into shared libraries.

Usage: python csrc/build.py [--out DIR] [--cuda {auto,on,off}] [--debug]

Outputs (in DIR, default ``tsjax/_lib``):
  libtsjax_cpu.so   all ``csrc/**/*.cc`` files, compiled with the system C++ compiler
  libtsjax_cuda.so  all ``csrc/**/*.cu`` files plus ``*.cc`` files under ``csrc/ffi/cuda``,
                    compiled with ``nvcc`` when it is found (``--cuda auto``), forced with
                    ``--cuda on`` (error if nvcc is missing) or skipped with ``--cuda off``.

The environment variable ``TSJAX_CUDA`` (auto/on/off) sets the default of ``--cuda``;
``TSJAX_CUDA_ARCH`` the ``-gencode`` list (default sm_80 + sm_90, i.e. A100 and H100).

The XLA FFI headers come from ``jax.ffi.include_dir()``, so jax must be importable.
This file is also used by setup.py (``pip install -e .``).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CXXFLAGS = ["-O3", "-std=c++17", "-fPIC", "-shared", "-ffp-contract=off", "-march=x86-64-v2"]


def _jax_include() -> str:
    try:
        import jax.ffi
    except ImportError as e:  # pragma: no cover - exercised only on broken installs
        raise SystemExit(f"csrc/build.py: jax must be installed to build the FFI kernels ({e})")
    return jax.ffi.include_dir()


def _run(cmd: list[str]) -> None:
    print("  $ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _cpu_sources() -> list[Path]:
    return sorted(p for p in ROOT.rglob("*.cc") if "cuda" not in p.relative_to(ROOT).parts)


def _cuda_sources() -> list[Path]:
    cu = sorted(ROOT.rglob("*.cu"))
    cc = sorted(p for p in ROOT.rglob("*.cc") if "cuda" in p.relative_to(ROOT).parts)
    return cu + cc


def build(out: Path, cuda: str = "auto", debug: bool = False) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    inc = ["-I", _jax_include(), "-I", str(ROOT)]
    built: dict[str, Path] = {}
    cpu = _cpu_sources()
    if not cpu:
        print("csrc/build.py: no C++ sources found, nothing to build")
        return built
    cxx = os.environ.get("CXX", shutil.which("g++") or shutil.which("c++") or "c++")
    flags = list(CXXFLAGS)
    if debug:
        flags = [f for f in flags if f != "-O3"] + ["-O0", "-g"]
    target = out / "libtsjax_cpu.so"
    print(f"csrc/build.py: building {target.name} ({len(cpu)} sources) with {cxx}")
    _run([cxx, *flags, *inc, *map(str, cpu), "-o", str(target), "-lpthread"])
    built["cpu"] = target

    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if Path("/usr/local/cuda/bin/nvcc").exists() else None)
    srcs = _cuda_sources()
    if cuda == "off":
        print("csrc/build.py: CUDA kernels skipped (--cuda off)")
    elif not srcs:
        print("csrc/build.py: no CUDA sources found")
    elif nvcc is None:
        if cuda == "on":
            raise SystemExit("csrc/build.py: --cuda on but nvcc was not found on PATH")
        print("csrc/build.py: nvcc not found; CUDA kernels skipped (CPU kernels only). "
              "Install the CUDA toolkit or set TSJAX_CUDA=on to require them.")
    else:
        arch = os.environ.get(
            "TSJAX_CUDA_ARCH",
            "-gencode=arch=compute_80,code=sm_80 -gencode=arch=compute_90,code=sm_90",
        ).split()
        target = out / "libtsjax_cuda.so"
        print(f"csrc/build.py: building {target.name} ({len(srcs)} sources) with {nvcc}")
        _run([nvcc, "-O3", "-std=c++17", "-shared", "-Xcompiler", "-fPIC",
              "--expt-relaxed-constexpr", "--fmad=false", *arch, *inc, *map(str, srcs), "-o", str(target)])
        built["cuda"] = target
    return built


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=ROOT.parent / "tsjax" / "_lib")
    ap.add_argument("--cuda", choices=["auto", "on", "off"], default=os.environ.get("TSJAX_CUDA", "auto"))
    ap.add_argument("--debug", action="store_true")
    args = ap.parse_args(argv)
    try:
        build(args.out, args.cuda, args.debug)
    except subprocess.CalledProcessError as e:
        print(f"csrc/build.py: compiler failed with exit code {e.returncode}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
