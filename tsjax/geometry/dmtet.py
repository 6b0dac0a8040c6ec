"""DMTet model: hash-grid SDF + deformation field, hash-grid material field, static-shape extraction.

Fields (all evaluated in world space, inside the grid cube ``[-s/2, s/2]^3``, ``s = grid_scale``):
  * geometry: hash-grid encoding (:mod:`tsjax.geometry.hashgrid`) -> MLP (``sdf_hidden`` units x
    ``sdf_layers`` ReLU layers) -> two linear heads: SDF (1, negative inside) and deformation (3),
    ``deform = deform_fraction * cell * tanh(raw)`` so a vertex moves at most a fixed fraction of a grid
    cell along each axis (the deformation head starts at 0).
  * material: its own hash grid -> MLP (``material_hidden`` x ``material_layers``) -> sigmoid albedo,
    which is **sRGB** (docs/conventions.md: stage-2 albedo fields predict sRGB directly).

Parameters are a plain dict pytree ``{"sdf_enc", "sdf_mlp", "mat_enc", "mat_mlp"}`` (the keys are the
optimiser groups of the method notes: encoding 1e-4, geometry MLP 2e-5, material 2e-5).

SDF initialisation (:func:`fit_sdf`): Adam on sampled points towards a target SDF, either a sphere
(:func:`sphere_sdf`) or a mesh (:func:`mesh_sdf`: unsigned distance to dense surface samples, sign from
the generalised winding number, so non-watertight and multi-part meshes work).
"""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float

from tsjax.geometry.hashgrid import HashGridConfig, encode, init_hashgrid, progressive_mask
from tsjax.geometry.marching import TriMesh, marching_tets
from tsjax.geometry.tets import TetGrid, build_tet_grid

__all__ = ["DMTetConfig", "DMTetModel", "init", "sdf_and_deform", "extract", "albedo", "fit_sdf",
           "sphere_sdf", "mesh_sdf", "winding_number", "param_labels"]


@dataclass(frozen=True, kw_only=True)
class DMTetConfig:
    """DMTet hyper-parameters (defaults: method notes, except the grid resolution, see tets.py).

    Attributes:
      grid_resolution: tet-grid cells per side N (``N = 97`` has the paper's ~0.94M vertices).
      grid_scale: side of the grid cube (bounds ``[-grid_scale/2, grid_scale/2]^3``).
      max_faces / max_verts: static capacities of the extracted mesh (``max_verts`` None = max_faces).
      sdf_grid / material_grid: hash-grid configs of the two fields.
      sdf_hidden, sdf_layers: geometry MLP width and number of hidden layers.
      deform_fraction: deformation bound as a fraction of a grid cell (0 disables deformation).
      material_hidden, material_layers: material MLP width and number of hidden layers.
      progressive_start_level, progressive_update_steps: progressive band of the SDF hash grid
        (:func:`tsjax.geometry.hashgrid.progressive_mask`; update_steps <= 0 = all levels from the start).
      close_boundary: clamp the SDF to a small positive value on the grid cube's outer vertices in
        :func:`extract`, so the extracted surface is always closed (a shape that reaches the cube's
        faces, e.g. a mesh normalised to the unit cube in a grid of scale 1, is capped there instead
        of cut open). Off by default (the plain DMTet surface).
    """

    grid_resolution: int = 97
    grid_scale: float = 1.0
    max_faces: int = 300_000
    max_verts: int | None = None
    sdf_grid: HashGridConfig = HashGridConfig()
    sdf_hidden: int = 64
    sdf_layers: int = 1
    deform_fraction: float = 0.25
    material_grid: HashGridConfig = HashGridConfig()
    material_hidden: int = 64
    material_layers: int = 2
    progressive_start_level: int = 4
    progressive_update_steps: int = 500
    close_boundary: bool = False

    def __post_init__(self):
        if self.grid_resolution < 1 or self.grid_scale <= 0 or self.max_faces < 1:
            raise ValueError(f"DMTetConfig: grid_resolution, grid_scale and max_faces must be positive, got "
                             f"{self.grid_resolution}, {self.grid_scale}, {self.max_faces}")
        if not 0.0 <= self.deform_fraction < 0.5:
            raise ValueError(f"DMTetConfig: deform_fraction must be in [0, 0.5) (tets must not invert), "
                             f"got {self.deform_fraction}")

    @property
    def cell_size(self) -> float:
        return self.grid_scale / self.grid_resolution

    def replace(self, **kw) -> "DMTetConfig":
        return dataclasses.replace(self, **kw)


# ------------------------------------------------------------------------------------------ MLPs
def _init_mlp(key, sizes, zero_last: bool = False):
    layers = []
    keys = jax.random.split(key, len(sizes) - 1)
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        last = i == len(sizes) - 2
        w = jax.random.normal(keys[i], (a, b), jnp.float32) * np.sqrt((1.0 if last else 2.0) / a)
        if last and zero_last:
            w = jnp.zeros((a, b), jnp.float32)
        layers.append({"w": w, "b": jnp.zeros((b,), jnp.float32)})
    return layers


def _mlp(layers, x):
    for i, lyr in enumerate(layers):
        x = x @ lyr["w"] + lyr["b"]
        if i < len(layers) - 1:
            x = jax.nn.relu(x)
    return x


def init(key, cfg: DMTetConfig) -> dict:
    """Random parameters (SDF head ~ 0 up to tiny encoding noise, deformation head exactly 0)."""
    k = jax.random.split(key, 5)
    hid = [cfg.sdf_hidden] * cfg.sdf_layers
    trunk = _init_mlp(k[1], [cfg.sdf_grid.output_dim] + hid + [1])
    deform = _init_mlp(k[2], [hid[-1] if hid else cfg.sdf_grid.output_dim, 3], zero_last=True)
    mat = _init_mlp(k[4], [cfg.material_grid.output_dim] + [cfg.material_hidden] * cfg.material_layers + [3])
    return {"sdf_enc": init_hashgrid(k[0], cfg.sdf_grid), "sdf_mlp": {"layers": trunk, "deform": deform},
            "mat_enc": init_hashgrid(k[3], cfg.material_grid), "mat_mlp": {"layers": mat}}


def param_labels(params: dict) -> dict:
    """Optimiser group label per leaf ("sdf_enc" | "sdf_mlp" | "mat_enc" | "mat_mlp"), for optax.multi_transform."""
    return {k: jax.tree_util.tree_map(lambda _: k, v) for k, v in params.items()}


def _unit(points, cfg: DMTetConfig):
    return jnp.asarray(points, jnp.float32) / cfg.grid_scale + 0.5


def sdf_and_deform(params: dict, points: Float[Array, "n 3"], cfg: DMTetConfig, step=None
                   ) -> tuple[Float[Array, " n"], Float[Array, "n 3"]]:
    """SDF [N] (negative inside, world units) and deformation offsets [N, 3] (world units) at ``points``.

    ``step`` (int, optional) applies the progressive level band; None = all levels active.
    """
    mask = None
    if step is not None:
        mask = progressive_mask(step, cfg.sdf_grid.n_levels, start_level=cfg.progressive_start_level,
                                update_steps=cfg.progressive_update_steps)
    feat = encode(params["sdf_enc"], _unit(points, cfg), cfg.sdf_grid, mask)
    layers = params["sdf_mlp"]["layers"]
    h = feat
    for lyr in layers[:-1]:
        h = jax.nn.relu(h @ lyr["w"] + lyr["b"])
    sdf = (h @ layers[-1]["w"] + layers[-1]["b"])[:, 0]
    raw = _mlp(params["sdf_mlp"]["deform"], h)
    deform = cfg.deform_fraction * cfg.cell_size * jnp.tanh(raw)
    return sdf, deform


def albedo(params: dict, points: Float[Array, "... 3"], cfg: DMTetConfig) -> Float[Array, "... 3"]:
    """sRGB albedo in [0, 1] at world ``points`` [..., 3] (any leading shape)."""
    pts = jnp.asarray(points, jnp.float32)
    flat = pts.reshape(-1, 3)
    feat = encode(params["mat_enc"], _unit(flat, cfg), cfg.material_grid)
    return jax.nn.sigmoid(_mlp(params["mat_mlp"]["layers"], feat)).reshape(pts.shape)


def extract(params: dict, grid: TetGrid, cfg: DMTetConfig, step=None) -> TriMesh:
    """Evaluate the fields at the grid vertices and run static-shape marching tets (jittable).

    Returns a :class:`~tsjax.geometry.marching.TriMesh` with ``cfg.max_faces`` / ``cfg.max_verts`` slots.
    With ``cfg.close_boundary`` the surface is capped at the grid cube's faces (always closed).
    """
    sdf, deform = sdf_and_deform(params, grid.verts, cfg, step)
    if cfg.close_boundary:
        on_boundary = jnp.any(jnp.abs(grid.verts) >= 0.5 * grid.scale * (1 - 1e-6), axis=1)
        sdf = jnp.where(on_boundary, jnp.maximum(sdf, 1e-4 * cfg.cell_size), sdf)
    return marching_tets(grid.verts + deform, sdf, grid, max_faces=cfg.max_faces, max_verts=cfg.max_verts)


# ------------------------------------------------------------------------------- SDF targets / fit
def sphere_sdf(radius: float = 0.3, center=(0.0, 0.0, 0.0)):
    """Target SDF function ``points [N,3] -> [N]`` of a sphere (numpy)."""
    c = np.asarray(center, np.float64)
    return lambda p: (np.linalg.norm(np.asarray(p, np.float64) - c, axis=-1) - radius).astype(np.float32)


@jax.jit
def _winding_chunk(p, tri):
    a, b, c = tri[None, :, 0] - p[:, None], tri[None, :, 1] - p[:, None], tri[None, :, 2] - p[:, None]
    la, lb, lc = (jnp.linalg.norm(v, axis=-1) for v in (a, b, c))
    det = jnp.sum(a * jnp.cross(b, c), -1)
    den = la * lb * lc + jnp.sum(a * b, -1) * lc + jnp.sum(a * c, -1) * lb + jnp.sum(b * c, -1) * la
    return jnp.sum(2.0 * jnp.arctan2(det, den), axis=1) / (4.0 * np.pi)


def winding_number(verts: np.ndarray, faces: np.ndarray, points: np.ndarray, chunk_elems: int = 1 << 22
                   ) -> np.ndarray:
    """Generalised winding number [N] of ``points`` w.r.t. a triangle soup (Jacobson et al. 2013).

    ~1 inside a closed, outward-oriented surface, ~0 outside, fractional near holes; parts add up.
    """
    tri = jnp.asarray(np.asarray(verts, np.float32)[np.asarray(faces)])
    pts = np.asarray(points, np.float32)
    c = max(1, chunk_elems // max(1, tri.shape[0]))
    pad = (-len(pts)) % c
    pts_p = np.concatenate([pts, np.zeros((pad, 3), np.float32)])
    out = [np.asarray(_winding_chunk(jnp.asarray(pts_p[i:i + c]), tri)) for i in range(0, len(pts_p), c)]
    return np.concatenate(out)[:len(pts)]


def _sample_surface(verts, faces, n, rng):
    tri = np.asarray(verts, np.float64)[np.asarray(faces)]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    idx = rng.choice(len(tri), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], 1)
    return np.einsum("nk,nkd->nd", w, tri[idx])


def mesh_sdf(verts: np.ndarray, faces: np.ndarray, *, n_surface: int = 200_000, seed: int = 0):
    """Target SDF function ``points [N,3] -> [N]`` (numpy) of a triangle mesh (any topology).

    The returned function has an attribute ``surface_points`` [n_surface, 3] (the surface samples).
    Magnitude: distance to the nearest of ``n_surface`` area-uniform surface samples (a KD-tree; error
    ~ sample spacing). Sign: negative where the generalised winding number exceeds 0.5, which is robust
    to holes, self-intersections and several overlapping parts.
    """
    from scipy.spatial import cKDTree

    verts = np.asarray(verts, np.float32)
    faces = np.asarray(faces, np.int64)
    if verts.ndim != 2 or verts.shape[1] != 3 or faces.ndim != 2 or faces.shape[1] != 3 or len(faces) == 0:
        raise ValueError(f"mesh_sdf: need verts [V,3] and a non-empty faces [F,3], got {verts.shape}, {faces.shape}")
    samples = _sample_surface(verts, faces, n_surface, np.random.default_rng(seed))
    tree = cKDTree(samples)

    def fn(p):
        p = np.asarray(p, np.float32)
        d, _ = tree.query(p, workers=-1)
        inside = winding_number(verts, faces, p) > 0.5
        return np.where(inside, -d, d).astype(np.float32)

    fn.surface_points = samples.astype(np.float32)  # used by fit_sdf for near-surface samples
    return fn


def fit_sdf(params: dict, cfg: DMTetConfig, target_fn, key, *, steps: int = 300, n_points: int = 200_000,
            batch: int = 8192, lr: float = 1e-2, truncation: float = 0.1, surface_points=None,
            step: int | None = 0) -> dict:
    """Fit the SDF field to ``target_fn`` (numpy ``[N,3] -> [N]``) with Adam; returns new params.

    Points: a pool of ``n_points`` (targets computed once), half uniform in the grid cube, half near the
    surface (``surface_points`` [M,3], default ``target_fn.surface_points`` when present, plus Gaussian
    noise of 2 grid cells; without surface samples all points are uniform). The pool must be much larger
    than a batch: a hash grid memorises a small pool and is then noisy between the samples.
    Loss: mean |sdf - clip(target, -truncation, truncation)|, Adam with a cosine-decayed learning rate.
    ``step`` is the progressive-band step the fit sees (default 0: only the coarse start levels, which
    gives a smooth initial surface; None: all levels). Only ``sdf_enc``/``sdf_mlp`` change.
    """
    rng = np.random.default_rng(int(jax.random.randint(key, (), 0, 2 ** 31 - 1)))
    half = cfg.grid_scale / 2
    if surface_points is None:
        surface_points = getattr(target_fn, "surface_points", None)
    pts = rng.uniform(-half, half, size=(n_points, 3))
    if surface_points is not None:
        sp = np.asarray(surface_points, np.float64)
        sel = sp[rng.integers(0, len(sp), n_points // 2)]
        pts[: n_points // 2] = np.clip(sel + rng.normal(size=sel.shape) * 2 * cfg.cell_size, -half, half)
    pts = pts.astype(np.float32)
    target = np.clip(target_fn(pts), -truncation, truncation).astype(np.float32)
    geo = {"sdf_enc": params["sdf_enc"], "sdf_mlp": params["sdf_mlp"]}
    opt = optax.adam(optax.cosine_decay_schedule(lr, max(steps, 1), alpha=0.05))
    state = opt.init(geo)

    @jax.jit
    def step_fn(geo, state, p, t):
        def loss_fn(g):
            s, _ = sdf_and_deform(g, p, cfg, step)
            return jnp.mean(jnp.abs(s - t))

        loss, grads = jax.value_and_grad(loss_fn)(geo)
        # the deformation head is not part of the fit
        grads["sdf_mlp"]["deform"] = jax.tree_util.tree_map(jnp.zeros_like, grads["sdf_mlp"]["deform"])
        upd, state = opt.update(grads, state, geo)
        return optax.apply_updates(geo, upd), state, loss

    for i in range(steps):
        sel = rng.integers(0, n_points, batch)
        geo, state, _ = step_fn(geo, state, jnp.asarray(pts[sel]), jnp.asarray(target[sel]))
    return {**params, **geo}


# ------------------------------------------------------------------------------------ the model
@dataclass(frozen=True)
class DMTetModel:
    """Convenience wrapper binding a :class:`DMTetConfig` to the functional API.

    ``model.init(key)``, ``model.sdf_and_deform(params, points, step=None)``, ``model.extract(params, grid,
    step=None)``, ``model.albedo(params, points)``, ``model.render(params, grid, cams, resolution, ...)``,
    ``model.grid()`` (the cached tet grid of ``config.grid_resolution``).
    """

    config: DMTetConfig = DMTetConfig()

    def grid(self, **kw) -> TetGrid:
        return build_tet_grid(self.config.grid_resolution, scale=self.config.grid_scale, **kw)

    def init(self, key) -> dict:
        return init(key, self.config)

    def sdf_and_deform(self, params, points, step=None):
        return sdf_and_deform(params, points, self.config, step)

    def albedo(self, params, points):
        return albedo(params, points, self.config)

    def extract(self, params, grid: TetGrid, step=None) -> TriMesh:
        return extract(params, grid, self.config, step)

    def render(self, params, grid: TetGrid, cams, resolution, **kw) -> dict:
        from tsjax.geometry.render import render

        return render(params, grid, cams, resolution, self.config, **kw)

    def fit_sdf(self, params, target_fn, key, **kw) -> dict:
        return fit_sdf(params, self.config, target_fn, key, **kw)
