"""Differentiable graphics primitives (nvdiffrast-like): rasterize, interpolate, texture, antialias.

Shapes and conventions are in each function's docstring and in docs/conventions.md.
"""
from tsjax.ops.antialias import antialias
from tsjax.ops.interpolate import interpolate
from tsjax.ops.rasterize import rasterize
from tsjax.ops.texture import texture

__all__ = ["rasterize", "interpolate", "texture", "antialias"]
