"""tsjax: a fast, pure-JAX/Flax implementation of ThemeStation (theme-aware 3D-to-3D generation).

``pip install --no-build-isolation -e .`` compiles the native kernels in ``csrc/`` (CPU always,
CUDA when ``nvcc`` is found) into ``tsjax/_lib`` via ``csrc/build.py``. ``--no-build-isolation`` is
needed because the build reads the XLA FFI headers from the installed jax.
"""
import importlib.util
from pathlib import Path

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).resolve().parent


def _reqs(name: str) -> list[str]:
    lines = (HERE / name).read_text().splitlines()
    return [l.strip() for l in lines if l.strip() and not l.startswith(("#", "-r"))]


class BuildKernels(build_ext):
    """Runs csrc/build.py instead of setuptools' own compiler driver."""

    def run(self):
        spec = importlib.util.spec_from_file_location("tsjax_csrc_build", HERE / "csrc" / "build.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        out = HERE / "tsjax" / "_lib" if self.inplace else Path(self.build_lib) / "tsjax" / "_lib"
        mod.build(out)
        if not self.inplace:  # also keep a copy in the tree for editable-style runs
            mod.build(HERE / "tsjax" / "_lib")


setup(
    name="tsjax",
    version="0.1.0",
    description="ThemeStation (theme-aware 3D-to-3D generation) in JAX/Flax",
    long_description=(HERE / "README.md").read_text() if (HERE / "README.md").exists() else "",
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["tsjax", "tsjax.*"]),
    package_data={"tsjax": ["_lib/*.so"]},
    install_requires=_reqs("requirements.txt"),
    extras_require={"test": [r for r in _reqs("requirements-test.txt") if r not in _reqs("requirements.txt")]},
    # A placeholder extension makes setuptools call build_ext; BuildKernels does the real work.
    ext_modules=[Extension("tsjax._lib._placeholder", sources=[])],
    cmdclass={"build_ext": BuildKernels},
    entry_points={"console_scripts": ["tsjax-optimize=tsjax.optimize:main", "tsjax-render=tsjax.render.__main__:main"]},
)
