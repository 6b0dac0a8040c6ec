"""Multi-resolution hash-grid encoding (Instant-NGP style) in pure JAX, with a progressive level band.

Level ``l`` (0-based) has ``R_l = floor(base_resolution * per_level_scale ** l)`` cells per side over the
unit cube ``[0, 1]^3`` (``(R_l + 1)^3`` lattice points). A level whose lattice fits in the table
(``(R_l + 1)^3 <= 2 ** log2_table_size``) is indexed densely, larger ones by the spatial hash
``(x * 1) ^ (y * 2654435761) ^ (z * 805459861) mod T`` (uint32 arithmetic). Features are trilinearly
interpolated from the 8 lattice corners. Defaults follow the method notes: 10 levels x 2 features,
table 2^19, base resolution 32, per-level scale 1.3195 (levels 32 ... 385 cells per side).

Progressive band: :func:`progressive_mask` returns a [L] float mask of the active levels as a function of
the optimisation step; masked levels output 0 (the output shape never changes, no recompilation).
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

__all__ = ["HashGridConfig", "init_hashgrid", "encode", "progressive_mask", "level_resolutions"]

_PRIMES = (1, 2654435761, 805459861)


@dataclass(frozen=True, kw_only=True)
class HashGridConfig:
    """Hash-grid hyper-parameters (defaults: method notes)."""

    n_levels: int = 10
    n_features: int = 2
    log2_table_size: int = 19
    base_resolution: int = 32
    per_level_scale: float = 1.3195
    init_scale: float = 1e-4  # table entries ~ U(-init_scale, init_scale)

    @property
    def output_dim(self) -> int:
        return self.n_levels * self.n_features

    def __post_init__(self):
        if self.n_levels < 1 or self.n_features < 1 or not 4 <= self.log2_table_size <= 26 or self.base_resolution < 1:
            raise ValueError(f"HashGridConfig: invalid values {self}")


def level_resolutions(cfg: HashGridConfig) -> list[int]:
    """Cells per side of every level."""
    return [int(np.floor(cfg.base_resolution * cfg.per_level_scale ** lvl)) for lvl in range(cfg.n_levels)]


def init_hashgrid(key, cfg: HashGridConfig) -> Float[Array, "l t f"]:
    """Feature tables [n_levels, 2**log2_table_size, n_features] float32, U(-init_scale, init_scale)."""
    shape = (cfg.n_levels, 2 ** cfg.log2_table_size, cfg.n_features)
    return jax.random.uniform(key, shape, jnp.float32, -cfg.init_scale, cfg.init_scale)


def _level_index(corner: jnp.ndarray, res: int, table_size: int) -> jnp.ndarray:
    """Table rows [..., 8] of integer lattice corners [..., 8, 3] (int32) for a level with ``res`` cells."""
    if (res + 1) ** 3 <= table_size:
        c = corner.astype(jnp.int32)
        return (c[..., 0] * (res + 1) + c[..., 1]) * (res + 1) + c[..., 2]
    c = corner.astype(jnp.uint32)
    h = c[..., 0] * jnp.uint32(_PRIMES[0]) ^ c[..., 1] * jnp.uint32(_PRIMES[1]) ^ c[..., 2] * jnp.uint32(_PRIMES[2])
    return (h & jnp.uint32(table_size - 1)).astype(jnp.int32)


_CORNERS = np.array([[(i >> 2) & 1, (i >> 1) & 1, i & 1] for i in range(8)], np.int32)  # [8, 3]


def encode(tables: Float[Array, "l t f"], x: Float[Array, "n 3"], cfg: HashGridConfig,
           level_mask: Float[Array, " l"] | None = None) -> Float[Array, "n d"]:
    """Encode points ``x`` [N, 3] in the unit cube [0, 1]^3 (clipped) into [N, n_levels * n_features].

    Features are ordered level-major (level 0 features first). ``level_mask`` [L] (1 = active, 0 = off)
    multiplies each level's features (see :func:`progressive_mask`). Differentiable w.r.t. ``tables`` and
    ``x`` (piecewise-linear in ``x``).
    """
    x = jnp.clip(jnp.asarray(x, jnp.float32), 0.0, 1.0)
    n_lvl, t, n_feat = tables.shape
    corners = jnp.asarray(_CORNERS)
    idxs, wts = [], []
    for lvl, res in enumerate(level_resolutions(cfg)):
        p = x * res
        p0 = jnp.minimum(jnp.floor(p), res - 1)  # cell corner, keeps x = 1 inside the last cell
        w = p - p0  # [N, 3] in [0, 1]
        c = p0.astype(jnp.int32)[:, None, :] + corners[None]  # [N, 8, 3]
        idxs.append(_level_index(c, res, t) + lvl * t)  # rows of the flattened [L*T, F] table
        wts.append(jnp.prod(jnp.where(corners[None] == 1, w[:, None, :], 1.0 - w[:, None, :]), axis=-1))
    idx = jnp.stack(idxs, axis=1)  # [N, L, 8]
    wc = jnp.stack(wts, axis=1)  # [N, L, 8]
    if level_mask is not None:
        wc = wc * jnp.asarray(level_mask, jnp.float32)[None, :, None]
    # one gather (and one scatter-add in the backward pass) over all levels
    f = jnp.einsum("nlk,nlkf->nlf", wc, tables.reshape(n_lvl * t, n_feat)[idx])
    return f.reshape(x.shape[0], n_lvl * n_feat)


def progressive_mask(step, n_levels: int, *, start_level: int = 4, start_step: int = 0,
                     update_steps: int = 500) -> Float[Array, " l"]:
    """Active-level mask [n_levels] float32 at ``step`` (int or traced int).

    ``start_level`` levels are active from the start; one more level turns on every ``update_steps``
    steps after ``start_step`` until all are active. ``update_steps <= 0`` activates all levels.
    """
    if update_steps <= 0:
        return jnp.ones((n_levels,), jnp.float32)
    step = jnp.asarray(step, jnp.int32)
    active = start_level + jnp.maximum(step - start_step, 0) // update_steps
    return (jnp.arange(n_levels) < active).astype(jnp.float32)
