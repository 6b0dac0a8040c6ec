"""Geometric / colour metrics on analytic shapes."""
from __future__ import annotations

import numpy as np
import pytest
import trimesh

from tsjax.metrics.geometric import (chamfer_distance, dominant_palette, novelty, pairwise_diversity,
                                     palette_distance, srgb_to_lab, voxel_iou, voxelize)


def sphere(r, centre=(0, 0, 0)):
    m = trimesh.creation.icosphere(subdivisions=4, radius=r)
    m.apply_translation(centre)
    return m


def sphere_iou(r, d):
    v = 4 / 3 * np.pi * r ** 3
    inter = np.pi * (4 * r + d) * (2 * r - d) ** 2 / 12 if d < 2 * r else 0.0
    return inter / (2 * v - inter)


@pytest.mark.parametrize("res", [32, 64])
def test_voxelize_volumes(res):
    box = trimesh.creation.box((0.5, 0.5, 0.5))
    assert voxelize(box, res).sum() / res ** 3 == pytest.approx(0.125, rel=1e-6)
    s = voxelize(sphere(0.3), res)
    assert s.shape == (res,) * 3 and s.dtype == bool
    assert s.sum() / res ** 3 == pytest.approx(4 / 3 * np.pi * 0.3 ** 3, rel=0.05)


@pytest.mark.parametrize("d", [0.0, 0.1, 0.2, 0.35])
def test_two_spheres_iou_analytic(d):
    got = voxel_iou(sphere(0.25), sphere(0.25, (d, 0.03, 0)), res=64)
    assert got == pytest.approx(sphere_iou(0.25, np.hypot(d, 0.03)), abs=0.01)


def test_voxelize_keeps_open_and_thin_surfaces():
    plate = trimesh.creation.box((0.8, 0.005, 0.8))  # thinner than a voxel
    g = voxelize(plate, 32)
    assert 0.8 * 32 * 0.8 * 32 * 0.9 <= g.sum() <= 2 * 26 * 26
    open_box = trimesh.creation.box((0.5, 0.5, 0.5))
    open_box.update_faces(open_box.face_normals[:, 1] < 0.9)  # remove the top
    assert voxelize(open_box, 32).sum() < 0.5 * 16 ** 3  # a hollow shell, not a solid
    # A separate lid floating just above the opening (a crack narrower than a voxel, as between the
    # parts of a low-poly kit model) is sealed by the closing; without it the box stays hollow.
    lid = trimesh.creation.box((0.5, 0.001, 0.5))
    lid.apply_translation((0, 0.25 + 2.2 / 32, 0))  # one empty voxel layer between walls and lid
    cracked = trimesh.util.concatenate([open_box, lid])
    assert 16 ** 3 <= voxelize(cracked, 32).sum() <= 16 * 16 * 19  # solid box + the sealed gap and lid
    assert voxelize(cracked, 32, close_gaps=0).sum() < 0.5 * 16 ** 3


def test_chamfer_identical_and_concentric():
    a = sphere(0.3)
    assert chamfer_distance(a, a.copy()) == 0.0
    # Concentric spheres: every point is |r1 - r2| from the other surface.
    assert chamfer_distance(a, sphere(0.2), n=20000) == pytest.approx(0.1, abs=4e-3)
    # Two large parallel squares, one translated along its normal by t.
    sq = trimesh.Trimesh([[-.4, 0, -.4], [.4, 0, -.4], [.4, 0, .4], [-.4, 0, .4]], [[0, 2, 1], [0, 3, 2]])
    moved = sq.copy()
    moved.apply_translation((0, 0.05, 0))
    assert chamfer_distance(sq, moved, n=20000) == pytest.approx(0.05, abs=3e-3)


def test_diversity_and_novelty():
    g = [voxelize(sphere(0.25, (x, 0, 0)), 32) for x in (0.0, 0.1, 0.2)]
    assert pairwise_diversity(g[:1]) is None
    assert pairwise_diversity([g[0], g[0]]) == 0.0
    div = pairwise_diversity(g)
    expected = np.mean([1 - voxel_iou(g[i], g[j]) for i, j in ((0, 1), (0, 2), (1, 2))])
    assert div == pytest.approx(expected) and 0.2 < div < 0.8
    nov = novelty(g, [g[0]])
    assert nov[0] == 0.0 and nov[1] < nov[2]
    with pytest.raises(ValueError, match="exemplar"):
        novelty(g, [])


def test_palette_distance():
    red = np.zeros((2, 8, 8, 3), np.float32)
    red[..., 0] = 0.8
    blue = red[..., ::-1].copy()
    mask = np.zeros((2, 8, 8, 1), np.float32)
    mask[:, 2:6, 2:6] = 1
    assert palette_distance(red, red) == 0.0
    # The background (white) is excluded by the masks.
    bg = np.ones_like(red)
    red_on_white = np.where(mask > 0, red, bg)
    assert palette_distance(red_on_white, red, mask, None) == pytest.approx(0.0, abs=1e-9)
    d_rb = palette_distance(red, blue)
    d_rr2 = palette_distance(red, red * 0.95)
    assert d_rb > 10 * d_rr2 > 0
    assert palette_distance(red, blue) == palette_distance(red, blue)  # deterministic
    # Lab of pure white/black and the sRGB red primary (reference values).
    np.testing.assert_allclose(srgb_to_lab(np.array([1.0, 1.0, 1.0])), [100, 0, 0], atol=1e-3)
    np.testing.assert_allclose(srgb_to_lab(np.array([1.0, 0.0, 0.0])), [53.24, 80.09, 67.20], atol=0.05)
    pal = dominant_palette(np.concatenate([red, blue[:1]]), k=2)
    assert pal.shape == (2, 4) and pal[0, 3] == pytest.approx(2 / 3)
    np.testing.assert_allclose(pal[0, :3], [0.8, 0, 0], atol=1e-6)


def test_bad_mesh_input():
    with pytest.raises(ValueError, match="expected a mesh"):
        voxelize("not a mesh")
    with pytest.raises(ValueError, match="no faces"):
        voxelize((np.zeros((3, 3)), np.zeros((0, 3), int)))
