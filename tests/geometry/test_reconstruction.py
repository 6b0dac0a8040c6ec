"""Multi-view reconstruction with DMTet: fit the hash-grid SDF + material field to renders of a known mesh.

Ground truth: the first built-in toy house (68 triangles, per-part colours, spans [-0.5, 0.5] in y),
rendered unlit (albedo) by :func:`tsjax.render.mesh_render.render_mesh` from 24 training cameras
(elevations -20/0/20/45 deg, azimuths every 15 deg, distance 2, fovy 40) and 4 held-out cameras at other
elevations/azimuths. Fit at grid 64 on CPU, in two stages:

1. Visual hull from the 24 training masks (a grid vertex is inside when it projects inside every mask),
   turned into a signed distance by two Euclidean distance transforms, and :func:`fit_sdf` of the DMTet
   SDF field to it.
2. Differentiable-render refinement of the SDF, deformation and material fields (Adam, 40 steps,
   4 random training views per step at 64 px): mask MSE + colour L1 + normal-map L1 + normal
   consistency, through marching tets and ``tsjax.ops`` (antialiased silhouettes).

The grid cube is enlarged to 1.1 (``grid_scale``) because the house touches the unit cube's faces: with
bounds [-0.5, 0.5]^3 the surface would be cut open at the grid boundary.

Measured on the 2-core CPU box (about a minute): voxel IoU 0.884 after stage 1 and 0.876 after stage 2
held-out colour PSNR 14.3 dB before stage 2 (untrained grey material) and 24.6 dB after. The render loss
fits the colours but does not improve the voxel IoU of this convex-ish shape: a larger geometry learning
rate (3e-3) lowered it to 0.843, and from a sphere initialisation (no hull) 80 steps reached only ~0.66
with a visibly noisy surface. A likely contributor is the antialiased silhouette of fine meshes being
~0.4 px too small (see test_dmtet_render.py), which the mask loss compensates by inflating the shape.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from scipy import ndimage
from scipy.interpolate import RegularGridInterpolator

from tsjax.data.builtin import builtin_theme
from tsjax.geometry.dmtet import DMTetConfig, DMTetModel, albedo, fit_sdf, init, param_labels
from tsjax.geometry.hashgrid import HashGridConfig
from tsjax.geometry.marching import compact_mesh, marching_tets
from tsjax.geometry.regularizers import normal_consistency
from tsjax.geometry.render import render, render_trimesh
from tsjax.metrics.geometric import voxel_iou
from tsjax.render.camera import Cameras, make_cameras, world_to_clip
from tsjax.render.mesh_render import render_mesh

N_TRAIN, N_HELD, RES, HULL_RES, STEPS, BATCH = 24, 4, 64, 128, 40, 4
HG = HashGridConfig(n_levels=4, log2_table_size=16, base_resolution=16, per_level_scale=1.5)
CFG = DMTetConfig(grid_resolution=64, grid_scale=1.1, max_faces=200_000, sdf_grid=HG, material_grid=HG,
                  progressive_update_steps=0)


def _cameras():
    el = np.array([-20.0, 0.0, 20.0, 45.0] * (N_TRAIN // 4) + [10.0, 30.0, -10.0, 60.0], np.float32)
    az = np.concatenate([np.arange(N_TRAIN) * 360.0 / N_TRAIN, np.arange(N_HELD) * 90.0 + 54.0])
    return make_cameras(el, az.astype(np.float32), 2.0, 40.0)


def _split(cams, sl):
    return Cameras(cams.c2w[sl], cams.proj[sl])


def _hull_sdf(grid, masks, cams, cfg):
    """Signed distance [Nv] (world units, negative inside) of the visual hull of ``masks`` [B,H,W] at
    the grid vertices, plus a target function for :func:`fit_sdf` (trilinear interpolation)."""
    b, h, w = masks.shape
    clip = np.asarray(world_to_clip(grid.verts, cams))
    ndc = clip[..., :2] / clip[..., 3:4]
    j = np.round((ndc[..., 0] + 1) / 2 * w - 0.5).astype(np.int64)
    i = np.round((1 - ndc[..., 1]) / 2 * h - 0.5).astype(np.int64)
    in_frame = (i >= 0) & (i < h) & (j >= 0) & (j < w)
    val = masks[np.arange(b)[:, None], np.clip(i, 0, h - 1), np.clip(j, 0, w - 1)]
    n = cfg.grid_resolution + 1
    occ = np.all(~in_frame | (val > 0.5), axis=0).reshape(n, n, n)  # grid vertices are x-major (ij)
    cell = cfg.cell_size
    sd = (ndimage.distance_transform_edt(~occ) - ndimage.distance_transform_edt(occ)
          + np.where(occ, 0.5, -0.5)) * cell
    lin = np.linspace(-cfg.grid_scale / 2, cfg.grid_scale / 2, n)
    interp = RegularGridInterpolator((lin, lin, lin), sd)
    return sd.reshape(-1), lambda q: interp(np.clip(q, lin[0], lin[-1])).astype(np.float32)


def _psnr(a, b):
    return float(10 * np.log10(1.0 / np.mean((np.asarray(a) - np.asarray(b)) ** 2)))


@pytest.mark.slow
def test_multiview_reconstruction_toy_house():
    gt_mesh = builtin_theme("toy-houses")[0]
    cams = _cameras()
    train, held = _split(cams, slice(0, N_TRAIN)), _split(cams, slice(N_TRAIN, None))
    gt = {k: jnp.asarray(v) for k, v in render_mesh(gt_mesh, cams, RES, lighting="none").items()}
    hull_masks = np.asarray(render_mesh(gt_mesh, train, HULL_RES, lighting="none")["mask"])[..., 0]

    model = DMTetModel(CFG)
    grid = model.grid()
    # stage 1: visual hull -> DMTet SDF
    sd, target = _hull_sdf(grid, hull_masks, train, CFG)
    p = init(jax.random.key(0), CFG)
    p = fit_sdf(p, CFG, target, jax.random.key(1), steps=100, n_points=60_000,
                surface_points=grid.verts[np.abs(sd) < 2 * CFG.cell_size], step=None)
    m1 = model.extract(p, grid)
    iou_hull = voxel_iou(compact_mesh(m1), gt_mesh, 64)
    psnr_before = _psnr(jax.jit(lambda q: render(q, grid, held, RES, CFG)["color"])(p), gt["color"][N_TRAIN:])

    # stage 2: differentiable-render refinement of geometry and material
    lrs = dict(sdf_enc=3e-4, sdf_mlp=1e-5, mat_enc=3e-2, mat_mlp=3e-3)
    opt = optax.multi_transform({k: optax.adam(optax.cosine_decay_schedule(v, STEPS, 0.1)) for k, v in lrs.items()},
                                param_labels(p))
    state = opt.init(p)

    def loss_fn(q, idx):
        s, d = model.sdf_and_deform(q, grid.verts)
        mesh = marching_tets(grid.verts + d, s, grid, max_faces=CFG.max_faces)
        o = render_trimesh(mesh, lambda x: albedo(q, x, CFG), _split(train, idx), RES)
        l_mask = jnp.mean((o["mask"] - gt["mask"][idx]) ** 2)
        l_col = jnp.mean(jnp.abs(o["color"] - gt["color"][idx]))
        l_nrm = jnp.mean(jnp.abs(o["normal"] - gt["normal"][idx]))
        return 10 * l_mask + l_col + l_nrm + 0.3 * normal_consistency(mesh), (l_col, mesh.overflow)

    @jax.jit
    def step(q, st, idx):
        (loss, aux), g = jax.value_and_grad(loss_fn, has_aux=True)(q, idx)
        upd, st = opt.update(g, st, q)
        return optax.apply_updates(q, upd), st, loss, aux

    rng = np.random.default_rng(0)
    losses, overflow = [], 0
    for _ in range(STEPS):
        p, state, loss, (l_col, ov) = step(p, state, jnp.asarray(rng.choice(N_TRAIN, BATCH, replace=False)))
        losses.append(float(loss))
        overflow = max(overflow, int(ov))
    assert np.isfinite(losses).all() and overflow == 0
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])

    m2 = model.extract(p, grid)
    assert int(m2.overflow) == 0
    iou = voxel_iou(compact_mesh(m2), gt_mesh, 64)
    psnr = _psnr(jax.jit(lambda q: render(q, grid, held, RES, CFG)["color"])(p), gt["color"][N_TRAIN:])
    print(f"voxel IoU hull-fit {iou_hull:.3f} final {iou:.3f}; held-out PSNR before {psnr_before:.1f} "
          f"after {psnr:.1f} dB")
    assert iou_hull >= 0.85 and iou >= 0.85
    assert psnr_before < 16.0 and psnr >= 20.0
