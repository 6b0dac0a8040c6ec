"""Built-in procedural exemplar themes (the no-files default).

Each theme is a deterministic function of a seed that returns 3-4 coloured meshes sharing one palette
and construction style, built from primitives (boxes, prisms, cylinders, cones, spheres). Parts are
closed primitives placed so that they touch or overlap (watertight per part, not boolean-merged).
Colours are linear RGB per vertex (no textures); meshes are normalised into the unit cube.

Themes:
  * ``toy-houses``: box body, gable (prism) or hip (pyramid) roof, door, windows, optional chimney.
  * ``mushrooms``: one to three mushrooms on a grass disc: cylinder/cone stems, dome caps with spots.
  * ``toy-rockets``: cylindrical body, cone nose, 3-4 fins, window, optional booster rings.
"""
from __future__ import annotations

import numpy as np
import trimesh

from tsjax.data.mesh import Mesh, mesh_from_arrays, normalize

__all__ = ["THEMES", "DEFAULT_THEME", "builtin_theme"]


def _lin(hex_rgb: str) -> np.ndarray:
    """sRGB hex -> linear RGB (palettes are authored in sRGB like a designer would)."""
    c = np.array([int(hex_rgb[i:i + 2], 16) for i in (0, 2, 4)], np.float64) / 255.0
    return np.where(c <= 0.04045, c / 12.92, ((c + 0.055) / 1.055) ** 2.4)


class _Builder:
    def __init__(self):
        self.parts = []

    def add(self, m: trimesh.Trimesh, color: str, transform=None):
        m = m.copy()
        if transform is not None:
            m.apply_transform(transform)
        self.parts.append((np.asarray(m.vertices), np.asarray(m.faces), _lin(color)))

    def build(self, name: str) -> Mesh:
        vs, fs, cs, off = [], [], [], 0
        for v, f, c in self.parts:
            vs.append(v); fs.append(f + off); cs.append(np.broadcast_to(c, v.shape)); off += len(v)
        return normalize(mesh_from_arrays(np.concatenate(vs), np.concatenate(fs), np.concatenate(cs), name=name))


def _T(x=0.0, y=0.0, z=0.0):
    return trimesh.transformations.translation_matrix([x, y, z])


def _R(angle_deg, axis):
    return trimesh.transformations.rotation_matrix(np.deg2rad(angle_deg), axis)


def _box(sx, sy, sz):
    return trimesh.creation.box((sx, sy, sz))


def _prism(width, height, depth):
    """Gable roof: triangular cross-section in XY (base on y=0, apex at y=height), extruded along Z."""
    w, d = width / 2, depth / 2
    v = np.array([[-w, 0, -d], [w, 0, -d], [0, height, -d], [-w, 0, d], [w, 0, d], [0, height, d]], float)
    f = np.array([[0, 2, 1], [3, 4, 5], [0, 1, 4], [0, 4, 3], [1, 2, 5], [1, 5, 4], [2, 0, 3], [2, 3, 5]])
    m = trimesh.Trimesh(v, f, process=False)
    m.fix_normals()
    return m


def _pyramid(width, height, depth):
    w, d = width / 2, depth / 2
    v = np.array([[-w, 0, -d], [w, 0, -d], [w, 0, d], [-w, 0, d], [0, height, 0]], float)
    f = np.array([[0, 1, 2], [0, 2, 3], [0, 4, 1], [1, 4, 2], [2, 4, 3], [3, 4, 0]])
    m = trimesh.Trimesh(v, f, process=False)
    m.fix_normals()
    return m


def _cyl(r, h, sections=24):
    """Cylinder along +Y with its base at y=0."""
    return trimesh.creation.cylinder(radius=r, height=h, sections=sections, transform=_R(-90, [1, 0, 0]) @ _T(0, 0, h / 2))


def _cone(r, h, sections=24):
    return trimesh.creation.cone(radius=r, height=h, sections=sections, transform=_R(-90, [1, 0, 0]))


HOUSE_PALETTE = dict(walls=["f2e3c6", "e8c9a0", "f5f0e1", "d9b38c"], roof=["b5432f", "8a3b2a", "3f5a7a", "5b6e3a"],
                     door="6b4226", window="7fb3d5", chimney="8c8c8c", trim="ffffff")


def _house(rng: np.random.Generator, i: int) -> Mesh:
    b = _Builder()
    w, h, d = rng.uniform(0.8, 1.4), rng.uniform(0.6, 1.0), rng.uniform(0.7, 1.1)
    wall = HOUSE_PALETTE["walls"][i % 4]
    roof = HOUSE_PALETTE["roof"][int(rng.integers(4))]
    b.add(_box(w, h, d), wall, _T(0, h / 2, 0))
    rh = rng.uniform(0.35, 0.7)
    if i % 2 == 0:
        b.add(_prism(w + 0.12, rh, d + 0.12), roof, _T(0, h, 0))
    else:
        b.add(_pyramid(w + 0.12, rh, d + 0.12), roof, _T(0, h, 0))
    dw, dh = 0.18, min(0.38, 0.6 * h)
    b.add(_box(dw, dh, 0.04), HOUSE_PALETTE["door"], _T(rng.uniform(-0.2, 0.2) * w, dh / 2, d / 2 + 0.01))
    nwin = int(rng.integers(1, 3))
    for k in range(nwin):
        x = (-1) ** k * 0.3 * w
        b.add(_box(0.16, 0.16, 0.04), HOUSE_PALETTE["window"], _T(x, 0.65 * h, d / 2 + 0.01))
        b.add(_box(0.04, 0.16, 0.16), HOUSE_PALETTE["window"], _T((-1) ** k * (w / 2 + 0.01), 0.65 * h, 0))
    if rng.uniform() < 0.7:
        b.add(_box(0.12, rh + 0.1, 0.12), HOUSE_PALETTE["chimney"], _T(0.25 * w, h + rh * 0.5, -0.15 * d))
    return b.build(f"toy-house-{i}")


MUSHROOM_PALETTE = dict(cap=["d7263d", "f46036", "c0392b", "8e44ad"], stem="f4ecd8", spots="ffffff", grass="5c9e3a")


def _mushrooms(rng: np.random.Generator, i: int) -> Mesh:
    b = _Builder()
    b.add(_cyl(0.55, 0.06, 32), MUSHROOM_PALETTE["grass"])
    n = 1 + i % 3
    for k in range(n):
        ang = 2 * np.pi * k / n + rng.uniform(0, 0.5)
        rad = 0.0 if n == 1 else 0.25
        x, z = rad * np.cos(ang), rad * np.sin(ang)
        sh = rng.uniform(0.35, 0.8) * (1.0 if k == 0 else 0.7)
        sr = rng.uniform(0.06, 0.11)
        if rng.uniform() < 0.5:
            b.add(_cyl(sr, sh, 16), MUSHROOM_PALETTE["stem"], _T(x, 0.05, z))
        else:
            b.add(_cone(sr * 1.6, sh, 16), MUSHROOM_PALETTE["stem"], _T(x, 0.05, z))
        cr = rng.uniform(0.18, 0.3) * (1.0 if k == 0 else 0.75)
        flat = rng.uniform(0.45, 0.8)
        cap = trimesh.creation.icosphere(2, radius=cr)
        cap.apply_scale([1.0, flat, 1.0])
        cap_col = MUSHROOM_PALETTE["cap"][(i + k) % 4]
        b.add(cap, cap_col, _T(x, 0.05 + sh, z))
        for s in range(5):
            th, ph = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 1.1)
            p = np.array([np.sin(ph) * np.cos(th), np.cos(ph) * flat, np.sin(ph) * np.sin(th)]) * cr
            b.add(trimesh.creation.icosphere(1, radius=0.03 + 0.02 * rng.uniform()), MUSHROOM_PALETTE["spots"],
                  _T(x + p[0], 0.05 + sh + p[1], z + p[2]))
    return b.build(f"mushrooms-{i}")


ROCKET_PALETTE = dict(body=["eeeeee", "f0d9b5", "d0e4f5", "f7c8d0"], accent=["e63946", "1d3557", "f4a261", "2a9d8f"],
                      window="a8dadc", frame="457b9d", flame="ffb703")


def _rocket(rng: np.random.Generator, i: int) -> Mesh:
    b = _Builder()
    r, h = rng.uniform(0.14, 0.22), rng.uniform(0.7, 1.1)
    acc = ROCKET_PALETTE["accent"][i % 4]
    b.add(_cyl(r, h, 24), ROCKET_PALETTE["body"][i % 4], _T(0, 0.15, 0))
    b.add(_cone(r, rng.uniform(0.25, 0.45), 24), acc, _T(0, 0.15 + h, 0))
    nf = 3 + int(rng.integers(2))
    fh, fw = rng.uniform(0.25, 0.4), rng.uniform(0.15, 0.25)
    for k in range(nf):
        fin = _prism(0.04, fh, fw)  # thin triangular fin in the local YZ plane
        fin.apply_transform(_R(90, [0, 1, 0]))
        b.add(fin, acc, _R(360.0 * k / nf, [0, 1, 0]) @ _T(r + fw / 2 - 0.02, 0.0, 0) @ _R(90, [0, 1, 0]) @ _R(-90, [0, 1, 0]))
    b.add(_cyl(r * 0.45, 0.04, 20), ROCKET_PALETTE["frame"], _R(90, [1, 0, 0]) @ _T(0, r - 0.01, -(0.15 + 0.65 * h)) @ _R(0, [1, 0, 0]))
    b.add(_cyl(r * 0.33, 0.05, 20), ROCKET_PALETTE["window"], _R(90, [1, 0, 0]) @ _T(0, r, -(0.15 + 0.65 * h)))
    if rng.uniform() < 0.6:
        b.add(_cyl(r * 1.08, 0.05, 24), acc, _T(0, 0.15 + 0.3 * h, 0))
    b.add(_cone(r * 0.7, 0.15, 16), ROCKET_PALETTE["flame"], _R(180, [1, 0, 0]) @ _T(0, -0.15, 0))
    return b.build(f"toy-rocket-{i}")


_GENERATORS = {"toy-houses": (_house, 4), "mushrooms": (_mushrooms, 3), "toy-rockets": (_rocket, 4)}
THEMES: tuple[str, ...] = tuple(_GENERATORS)
DEFAULT_THEME = "toy-houses"


def builtin_theme(name: str = DEFAULT_THEME, seed: int = 0) -> list[Mesh]:
    """The meshes of built-in theme ``name`` (one of :data:`THEMES`), deterministic in ``seed``."""
    if name not in _GENERATORS:
        raise ValueError(f"unknown built-in theme {name!r} (available: {', '.join(THEMES)})")
    gen, n = _GENERATORS[name]
    return [gen(np.random.default_rng([int(seed), i]), i) for i in range(n)]
