"""Prompts of the ThemeStation stages and view-dependent suffixes.

* theme / reference prompt: ``"a 3D model of <class>, in the style of <token>"`` (paper 3.1, 3.3.3);
  normal maps add ``", normal map"``.
* concept prompt: ``"a 3D model of <token> <class>"`` (paper 3.3.2, "a 3D model of [V] owl").
* view-dependent suffixes (stage 2 and camera-conditioned sampling): ``", <front|side|back|overhead> view"``
  chosen from the camera's azimuth/elevation exactly like
  :func:`tsjax.render.camera.view_direction_names` (front |az| <= 45, back |az| >= 135, side otherwise,
  overhead above ``OVERHEAD_ELEVATION`` degrees).
"""
from __future__ import annotations

import jax.numpy as jnp

__all__ = ["DIRECTIONS", "OVERHEAD_ELEVATION", "theme_prompt", "concept_prompt", "view_prompts",
           "direction_ids"]

DIRECTIONS = ("front", "side", "back", "overhead")
OVERHEAD_ELEVATION = 60.0


def theme_prompt(class_name: str, token: str, *, normal: bool = False, normal_suffix: str = ", normal map") -> str:
    """The theme/reference prompt (optionally the normal-map variant)."""
    p = f"a 3D model of {class_name}, in the style of {token}"
    return p + normal_suffix if normal else p


def concept_prompt(class_name: str, token: str) -> str:
    """The concept-prior prompt."""
    return f"a 3D model of {token} {class_name}"


def view_prompts(base: str, suffixes: bool = True) -> list[str]:
    """``[base + ", <d> view" for d in DIRECTIONS]`` (the row order of every prompt table); with
    ``suffixes=False`` every row is ``base`` (``guidance.view_prompts=False``: priors that never saw the
    suffixes are prompted as they were trained)."""
    return [f"{base}, {d} view" if suffixes else base for d in DIRECTIONS]


def direction_ids(elevation, azimuth):
    """Per-view row index into :data:`DIRECTIONS` (jittable): ``[B]`` int32 from degrees ``[B]``."""
    el = jnp.asarray(elevation, jnp.float32)
    az = (jnp.asarray(azimuth, jnp.float32) + 180.0) % 360.0 - 180.0
    a = jnp.abs(az)
    d = jnp.where(a <= 45.0, 0, jnp.where(a >= 135.0, 2, 1))
    return jnp.where(el > OVERHEAD_ELEVATION, 3, d).astype(jnp.int32)
