"""Weight-free geometric and colour metrics (numpy/scipy; always computed).

All meshes are expected in the tsjax convention (normalised into the unit cube [-0.5, 0.5]^3, see
docs/conventions.md); geometry outside the cube is clipped by the voxeliser. A mesh argument is a
``tsjax.data.mesh.Mesh``, a ``trimesh.Trimesh`` or a ``(vertices [V,3], faces [F,3])`` pair.

- ``voxelize``: solid occupancy of voxel centres on a res^3 grid over the unit cube: the surface is
  rasterised into a shell (dense barycentric point grids, spacing <= half a voxel), the cavities
  enclosed by the shell are filled (``scipy.ndimage.binary_fill_holes``, 6-connected background,
  after a one-voxel morphological closing that seals cracks of non-watertight models), and
  shell voxels bordering that interior are kept when their centre is behind the nearest surface point
  (counter-clockwise = outward normals). Shell voxels not bordering an interior (open or thin
  sheets) stay occupied, so open meshes become one-voxel-thick shells.
- ``voxel_iou``: |A ∩ B| / |A ∪ B| of two occupancy grids.
- ``chamfer_distance``: symmetric mean nearest-neighbour distance between surface samples,
  0.5 * (mean_x min_y |x - y| + mean_y min_x |x - y|), in unit-cube units (not squared).
- ``pairwise_diversity``: mean over pairs of (1 - IoU) within a set of shapes.
- ``novelty``: for each shape, min over exemplars of (1 - IoU).
- ``palette_distance``: sliced 1-Wasserstein distance between the CIELAB colour distributions of the
  foreground pixels of two sets of renders (CIE76 ΔE-like units; 0 = same colour distribution).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage
from scipy.spatial import cKDTree


def mesh_arrays(mesh) -> tuple[np.ndarray, np.ndarray]:
    """``(vertices [V,3] float64, faces [F,3] int64)`` of a Mesh, trimesh.Trimesh or (verts, faces)."""
    if isinstance(mesh, tuple | list) and len(mesh) >= 2:
        v, f = mesh[0], mesh[1]
    elif hasattr(mesh, "vertices") and hasattr(mesh, "faces"):
        v, f = mesh.vertices, mesh.faces
    else:
        raise ValueError(f"expected a mesh (Mesh, trimesh.Trimesh or (verts, faces)), got {type(mesh).__name__}")
    v = np.asarray(v, np.float64)
    f = np.asarray(f, np.int64)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"mesh arrays must be vertices [V,3] and faces [F,3], got {v.shape} and {f.shape}")
    if len(f) == 0:
        raise ValueError("mesh has no faces")
    return v, f


def _surface_grid_points(v: np.ndarray, f: np.ndarray, spacing: float) -> tuple[np.ndarray, np.ndarray]:
    """Points on every triangle on a barycentric grid whose step is <= ``spacing`` along each edge.

    Returns (points [P,3], face index [P]).
    """
    tri = v[f]  # [F,3,3]
    edge = np.linalg.norm(tri - np.roll(tri, 1, axis=1), axis=-1).max(axis=1)
    n = np.maximum(1, np.ceil(edge / spacing).astype(np.int64))
    pts, ids = [], []
    for k in np.unique(n):
        i, j = np.meshgrid(np.arange(k + 1), np.arange(k + 1), indexing="ij")
        keep = i + j <= k
        bary = np.stack([i[keep], j[keep], k - i[keep] - j[keep]], axis=1) / k  # [P,3]
        sel = np.nonzero(n == k)[0]
        pts.append(np.einsum("pk,fkc->fpc", bary, tri[sel]).reshape(-1, 3))
        ids.append(np.repeat(sel, len(bary)))
    return np.concatenate(pts, axis=0), np.concatenate(ids, axis=0)


def voxelize(mesh, res: int = 64, close_gaps: int = 1) -> np.ndarray:
    """Solid occupancy grid [res, res, res] bool over [-0.5, 0.5]^3, indexed [x, y, z].

    Voxel (i, j, k) covers x in [-0.5 + i/res, -0.5 + (i+1)/res), etc. See the module docstring.
    ``close_gaps``: the shell is dilated by this many voxels before the cavity fill and the filled
    solid eroded back (a morphological closing), so cracks up to ~2 * close_gaps voxels wide between
    the parts of a non-watertight low-poly model do not leave it hollow; 0 disables it.
    """
    if res < 2:
        raise ValueError(f"voxel resolution must be >= 2, got {res}")
    if close_gaps < 0:
        raise ValueError(f"close_gaps must be >= 0, got {close_gaps}")
    v, f = mesh_arrays(mesh)
    pitch = 1.0 / res
    pts, fid = _surface_grid_points(v, f, 0.5 * pitch)
    idx = np.clip(np.floor((pts + 0.5) / pitch).astype(np.int64), 0, res - 1)
    m = close_gaps + 1  # empty margin so the outside stays connected around the dilated shell
    shell = np.zeros((res + 2 * m,) * 3, bool)
    shell[idx[:, 0] + m, idx[:, 1] + m, idx[:, 2] + m] = True
    cross = ndimage.generate_binary_structure(3, 1)
    if close_gaps:
        grown = ndimage.binary_dilation(shell, cross, iterations=close_gaps)
        filled = ndimage.binary_erosion(ndimage.binary_fill_holes(grown), cross, iterations=close_gaps)
    else:
        filled = ndimage.binary_fill_holes(shell)
    interior = filled & ~shell
    crop = (slice(m, -m),) * 3
    if not interior.any():
        return shell[crop]  # open or thin surface: keep the shell
    # Shell voxels next to an enclosed interior are kept only if their centre lies behind the nearest
    # surface point (outward = counter-clockwise face normal); elsewhere (thin sheets) they are kept.
    # (2 voxels: a surface lying on voxel boundaries marks both neighbours, making the shell 2 thick)
    near_interior = ndimage.binary_dilation(interior, structure=np.ones((3, 3, 3), bool), iterations=2)
    test = np.argwhere(shell & near_interior)
    centres = (test - m + 0.5) * pitch - 0.5
    tri = v[f]
    normals = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    # Vote over the 4 nearest surface points (robust at edges, where one face's plane contains the
    # offset); a centre exactly on the surface counts as outside.
    _, nn = cKDTree(pts).query(centres, k=4)
    side = np.einsum("nkc,nkc->n", centres[:, None] - pts[nn], normals[fid[nn]])
    inside = side < 0
    occ = interior | (shell & ~near_interior)
    occ[tuple(test[inside].T)] = True
    return occ[crop]


def voxel_iou(a, b, res: int = 64) -> float:
    """IoU of two shapes (meshes, voxelised at ``res``, or bool grids of equal shape); 1 if both empty."""
    ga = a if isinstance(a, np.ndarray) and a.dtype == bool else voxelize(a, res)
    gb = b if isinstance(b, np.ndarray) and b.dtype == bool else voxelize(b, res)
    if ga.shape != gb.shape:
        raise ValueError(f"voxel grids differ in shape: {ga.shape} vs {gb.shape}")
    union = np.logical_or(ga, gb).sum()
    return 1.0 if union == 0 else float(np.logical_and(ga, gb).sum() / union)


def sample_surface(mesh, n: int = 10000, seed: int = 0) -> np.ndarray:
    """``n`` area-uniform random points on the surface [n, 3] float64 (deterministic for ``seed``)."""
    v, f = mesh_arrays(mesh)
    tri = v[f]
    area = 0.5 * np.linalg.norm(np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0]), axis=1)
    if area.sum() <= 0:
        raise ValueError("mesh has zero surface area")
    rng = np.random.default_rng(seed)
    fi = rng.choice(len(f), size=n, p=area / area.sum())
    r1, r2 = rng.random(n), rng.random(n)
    s = np.sqrt(r1)
    w = np.stack([1 - s, s * (1 - r2), s * r2], axis=1)
    return np.einsum("nk,nkc->nc", w, tri[fi])


def chamfer_distance(a, b, n: int = 10000, seed: int = 0) -> float:
    """Symmetric chamfer distance between two meshes (or point sets [N,3]) in unit-cube units.

    Both meshes are sampled with the same ``seed``, so identical meshes give exactly 0.
    """
    pa = np.asarray(a, np.float64) if isinstance(a, np.ndarray) else sample_surface(a, n, seed)
    pb = np.asarray(b, np.float64) if isinstance(b, np.ndarray) else sample_surface(b, n, seed)
    da, _ = cKDTree(pb).query(pa)
    db, _ = cKDTree(pa).query(pb)
    return float(0.5 * (da.mean() + db.mean()))


def pairwise_diversity(grids: Sequence[np.ndarray]) -> float | None:
    """Mean (1 - IoU) over all unordered pairs of occupancy grids; None for fewer than 2 shapes."""
    n = len(grids)
    if n < 2:
        return None
    vals = [1.0 - voxel_iou(grids[i], grids[j]) for i in range(n) for j in range(i + 1, n)]
    return float(np.mean(vals))


def novelty(grids: Sequence[np.ndarray], exemplar_grids: Sequence[np.ndarray]) -> list[float]:
    """Per shape: min over exemplars of (1 - IoU) (0 = a copy of some exemplar)."""
    if not exemplar_grids:
        raise ValueError("novelty needs at least one exemplar")
    return [min(1.0 - voxel_iou(g, e) for e in exemplar_grids) for g in grids]


# ----------------------------------------------------------------------------------------------------
# Colour


def srgb_to_lab(rgb: np.ndarray) -> np.ndarray:
    """sRGB in [0, 1] [..., 3] -> CIELAB (D65 white) [..., 3] (L in [0, 100])."""
    c = np.clip(np.asarray(rgb, np.float64), 0.0, 1.0)
    lin = np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)
    m = np.array([[0.4124564, 0.3575761, 0.1804375],
                  [0.2126729, 0.7151522, 0.0721750],
                  [0.0193339, 0.1191920, 0.9503041]])
    xyz = lin @ m.T / np.array([0.95047, 1.0, 1.08883])
    e = 216.0 / 24389.0
    k = 24389.0 / 27.0
    fx = np.where(xyz > e, np.cbrt(xyz), (k * xyz + 16.0) / 116.0)
    L = 116.0 * fx[..., 1] - 16.0
    a = 500.0 * (fx[..., 0] - fx[..., 1])
    b = 200.0 * (fx[..., 1] - fx[..., 2])
    return np.stack([L, a, b], axis=-1)


def _foreground_lab(images: np.ndarray, masks: np.ndarray | None, threshold: float = 0.5) -> np.ndarray:
    images = np.asarray(images, np.float64)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"images must be [N,H,W,3] sRGB in [0,1], got shape {images.shape}")
    lab = srgb_to_lab(images).reshape(-1, 3)
    if masks is None:
        return lab
    m = np.asarray(masks, np.float64).reshape(-1) > threshold
    if m.size != lab.shape[0]:
        raise ValueError(f"masks {np.shape(masks)} do not match images {images.shape}")
    return lab[m]


def palette_distance(images_a, images_b, masks_a=None, masks_b=None, *, n_proj: int = 64,
                     n_quantiles: int = 256, seed: int = 0) -> float:
    """Sliced 1-Wasserstein distance between the foreground Lab colours of two sets of renders.

    Args:
      images_a, images_b: [N, H, W, 3] sRGB in [0, 1] (the set sizes and resolutions may differ).
      masks_a, masks_b: optional [N, H, W, 1] foreground masks (> 0.5 = foreground).
      n_proj: number of random unit directions in Lab (fixed by ``seed``, so the value is deterministic).
      n_quantiles: quantile grid on which the 1-D distributions are compared.

    Returns the mean over directions of the 1-D W1 distance (mean |quantile difference|), in Lab units.
    """
    la, lb = _foreground_lab(images_a, masks_a), _foreground_lab(images_b, masks_b)
    if len(la) == 0 or len(lb) == 0:
        raise ValueError("palette_distance: a set of renders has no foreground pixels")
    dirs = np.random.default_rng(seed).normal(size=(n_proj, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    q = (np.arange(n_quantiles) + 0.5) / n_quantiles
    qa = np.quantile(la @ dirs.T, q, axis=0)
    qb = np.quantile(lb @ dirs.T, q, axis=0)
    return float(np.mean(np.abs(qa - qb)))


def dominant_palette(images, masks=None, k: int = 5, iters: int = 20, seed: int = 0) -> np.ndarray:
    """k-means palette of the foreground colours: [k, 4] = (sRGB r, g, b in [0,1], weight), heaviest first.

    Clustering runs in Lab (deterministic k-means++ init from ``seed``); used for display in reports.
    """
    images = np.asarray(images, np.float64)
    rgb = images.reshape(-1, 3)
    if masks is not None:
        rgb = rgb[np.asarray(masks).reshape(-1) > 0.5]
    if len(rgb) == 0:
        raise ValueError("dominant_palette: no foreground pixels")
    rng = np.random.default_rng(seed)
    if len(rgb) > 20000:
        rgb = rgb[rng.choice(len(rgb), 20000, replace=False)]
    lab = srgb_to_lab(rgb)
    k = min(k, len(lab))
    centres = [lab[rng.integers(len(lab))]]
    for _ in range(1, k):
        d2 = np.min(((lab[:, None] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        centres.append(lab[rng.choice(len(lab), p=d2 / d2.sum())] if d2.sum() > 0 else lab[0])
    c = np.asarray(centres)
    for _ in range(iters):
        assign = np.argmin(((lab[:, None] - c[None]) ** 2).sum(-1), axis=1)
        c = np.stack([lab[assign == j].mean(0) if np.any(assign == j) else c[j] for j in range(k)])
    assign = np.argmin(((lab[:, None] - c[None]) ** 2).sum(-1), axis=1)
    w = np.bincount(assign, minlength=k) / len(lab)
    rgb_c = np.stack([rgb[assign == j].mean(0) if np.any(assign == j) else np.zeros(3) for j in range(k)])
    order = np.argsort(-w)
    return np.concatenate([rgb_c[order], w[order, None]], axis=1)
