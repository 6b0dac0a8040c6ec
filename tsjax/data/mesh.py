"""Mesh container and loaders (GLB / glTF / OBJ+MTL) following docs/conventions.md.

``Mesh`` holds numpy arrays: ``vertices [V,3] float32``, ``faces [F,3] int32`` (CCW = front),
``colors [V,3] float32`` (linear RGB base-colour factor per vertex; 1 where a texture carries the
colour), optional ``uv [V,2] float32`` (glTF convention: (0,0) = first texel, row 0 = top) and
``texture [Ht,Wt,3] float32`` (linear RGB), and a ``name``.

Loading (trimesh parses the file; the facts are handled here):
  * every primitive of every node is merged with its node's world transform (``Scene.dump``);
    skinned meshes therefore come out in their bind pose (skins/animations are ignored);
  * glTF ``baseColorFactor`` and ``COLOR_0`` (and OBJ/MTL ``Kd``) are linear and multiply into
    per-vertex ``colors``, so multi-material models keep one colour per material;
  * base-colour textures (embedded or an external URI resolved relative to the file) are decoded
    sRGB -> linear. Several textures are packed into one atlas: a grid of equal cells (each texture
    resized to the largest texture's size) plus one white cell for untextured primitives. UVs are
    remapped into their cell with a half-texel inset. Because an atlas cell cannot repeat, UVs outside
    [0, 1] are first shifted per face by an integer (``floor`` of the face's smallest uv) and then
    clamped to [0, 1]; single-repeat tiling is kept exactly, larger tiling is clamped at the edge.
    A model with a single texture keeps it as is (no resize);
  * zero-area faces are dropped (counted in ``Mesh.dropped_faces``); NaN/inf vertices, out-of-range
    indices, no triangles, missing or unsupported files raise one-line errors naming the file.
"""
from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

__all__ = ["Mesh", "load_mesh", "normalize", "load_exemplars", "mesh_from_arrays", "MESH_SUFFIXES"]

MESH_SUFFIXES = (".glb", ".gltf", ".obj")


@dataclass(frozen=True, eq=False)
class Mesh:
    """A triangle mesh (numpy arrays, see module docstring for shapes and colour spaces)."""

    vertices: np.ndarray
    faces: np.ndarray
    colors: np.ndarray
    uv: np.ndarray | None = None
    texture: np.ndarray | None = None
    name: str = "mesh"
    dropped_faces: int = field(default=0)

    @property
    def num_faces(self) -> int:
        return int(self.faces.shape[0])

    @property
    def num_vertices(self) -> int:
        return int(self.vertices.shape[0])

    def bounds(self) -> np.ndarray:
        """[2, 3] min and max corners."""
        return np.stack([self.vertices.min(0), self.vertices.max(0)])


def _srgb_to_linear_np(x: np.ndarray) -> np.ndarray:
    x = np.clip(x, 0.0, 1.0)
    return np.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4).astype(np.float32)


def mesh_from_arrays(vertices, faces, colors=None, uv=None, texture=None, *, name="mesh",
                     source: str | None = None) -> Mesh:
    """Validate arrays and build a :class:`Mesh`, dropping zero-area faces.

    Raises ValueError (naming ``source`` or ``name``) for no triangles, non-finite vertices, bad shapes
    or out-of-range face indices.
    """
    where = source or name
    v = np.asarray(vertices, np.float64)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3:
        raise ValueError(f"{where}: vertices must have shape [V, 3], got {v.shape}")
    if f.size == 0:
        raise ValueError(f"{where}: the mesh has no triangles")
    if f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{where}: faces must be triangles with shape [F, 3], got {f.shape}")
    if not np.all(np.isfinite(v)):
        raise ValueError(f"{where}: {int((~np.isfinite(v)).any(1).sum())} vertices are NaN or inf")
    f = f.astype(np.int64)
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{where}: face indices out of range [0, {len(v)}) (min {f.min()}, max {f.max()})")
    area2 = np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    keep = area2 > 1e-12 * max(1.0, float(np.ptp(v, axis=0).max()) ** 2)
    dropped = int((~keep).sum())
    f = f[keep]
    if len(f) == 0:
        raise ValueError(f"{where}: the mesh has no triangles with non-zero area")
    col = np.ones((len(v), 3), np.float32) if colors is None else np.asarray(colors, np.float32)
    if col.shape != (len(v), 3):
        raise ValueError(f"{where}: colors must have shape [{len(v)}, 3], got {col.shape}")
    if (uv is None) != (texture is None):
        raise ValueError(f"{where}: uv and texture must be given together")
    if uv is not None:
        uv = np.asarray(uv, np.float32)
        texture = np.asarray(texture, np.float32)
        if uv.shape != (len(v), 2) or texture.ndim != 3 or texture.shape[2] != 3:
            raise ValueError(f"{where}: uv must be [V, 2] and texture [Ht, Wt, 3], got {uv.shape}, {texture.shape}")
    return Mesh(v.astype(np.float32), f.astype(np.int32), col, uv, texture, name, dropped)


def normalize(mesh: Mesh) -> Mesh:
    """Centre the bounding box at the origin and scale its largest side to 1 (unit cube)."""
    lo, hi = mesh.vertices.min(0), mesh.vertices.max(0)
    scale = float((hi - lo).max())
    scale = scale if scale > 0 else 1.0
    v = ((mesh.vertices - (lo + hi) / 2) / scale).astype(np.float32)
    return dataclasses.replace(mesh, vertices=v)


# ----------------------------------------------------------------------------------------- loading
def _material_factor(mat) -> np.ndarray:
    """Linear RGB base-colour factor of a trimesh material (1 when absent)."""
    if mat is None:
        return np.ones(3, np.float32)
    f = getattr(mat, "baseColorFactor", None)
    if f is None:
        # SimpleMaterial (OBJ/MTL Kd, stored by trimesh as uint8 of Kd * 255). Kd is read as linear, as
        # Blender and most DCC exporters write the linear base colour there.
        f = getattr(mat, "diffuse", None)
        if f is None:
            return np.ones(3, np.float32)
        return np.asarray(f, np.float32)[:3] / 255.0
    f = np.asarray(f, np.float32)[:3]
    return f / 255.0 if f.max() > 1.0 or np.asarray(mat.baseColorFactor).dtype == np.uint8 else f


def _material_image(mat):
    if mat is None:
        return None
    img = getattr(mat, "baseColorTexture", None)
    if img is None:
        img = getattr(mat, "image", None)
    return img


def _image_to_linear(img) -> np.ndarray:
    arr = np.asarray(img.convert("RGB"), np.float32) / 255.0
    return _srgb_to_linear_np(arr)


def _wrap_uv_per_face(uv: np.ndarray, faces: np.ndarray):
    """Duplicate vertices per face and shift each face's uv by an integer so it starts in [0, 1)."""
    fuv = uv[faces]  # [F,3,2]
    shift = np.floor(fuv.min(axis=1, keepdims=True))
    return np.clip(fuv - shift, 0.0, 1.0)


def _read_scene(path: Path):
    import trimesh

    try:
        scene = trimesh.load(str(path), force="scene", process=False)
    except Exception as e:  # trimesh raises many types for corrupt files
        raise ValueError(f"{path}: cannot read mesh file ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    return scene


def load_mesh(path, *, normalize_to_unit_cube: bool = True) -> Mesh:
    """Load a GLB/glTF/OBJ(+MTL) file into one merged :class:`Mesh` (see module docstring).

    Args:
      path: file path.
      normalize_to_unit_cube: apply :func:`normalize` (default True, as everywhere in tsjax).
    """
    import trimesh

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such mesh file")
    if not path.is_file():
        raise ValueError(f"{path}: not a file")
    if path.suffix.lower() not in MESH_SUFFIXES:
        raise ValueError(f"{path}: unsupported mesh format {path.suffix!r} (expected one of {', '.join(MESH_SUFFIXES)})")
    scene = _read_scene(path)
    try:
        geoms = scene.dump(concatenate=False)
    except Exception as e:
        raise ValueError(f"{path}: cannot resolve the scene graph ({type(e).__name__}: {e})") from None
    parts = [g for g in geoms if isinstance(g, trimesh.Trimesh) and len(g.faces) > 0]
    if not parts:
        raise ValueError(f"{path}: the file contains no triangles")

    # collect per-part arrays; per-face-corner layout when any texture is present
    images: list = []
    image_index: dict[int, int] = {}
    recs = []
    for g in parts:
        vis = g.visual
        mat = getattr(vis, "material", None)
        factor = _material_factor(mat)
        vcol = None
        if getattr(vis, "kind", None) == "vertex" and hasattr(vis, "vertex_colors"):
            vcol = np.asarray(vis.vertex_colors, np.float32)[:, :3] / 255.0
        else:
            attr = getattr(vis, "vertex_attributes", {}) or {}
            if "color" in attr and len(attr["color"]) == len(g.vertices):
                c = np.asarray(attr["color"], np.float32)[:, :3]
                vcol = c / 255.0 if c.max() > 1.0 else c
        col = np.broadcast_to(factor, (len(g.vertices), 3)).astype(np.float32)
        if vcol is not None:
            col = col * vcol
        img = _material_image(mat)
        uv = getattr(vis, "uv", None)
        tex_id = None
        if img is not None and uv is not None and len(uv) == len(g.vertices):
            key = id(img)
            if key not in image_index:
                image_index[key] = len(images)
                images.append(img)
            tex_id = image_index[key]
            # trimesh stores uv with v up (OpenGL); tsjax uses the glTF convention (v down)
            uv = np.asarray(uv, np.float64).copy()
            uv[:, 1] = 1.0 - uv[:, 1]
        else:
            uv = None
        recs.append((np.asarray(g.vertices, np.float64), np.asarray(g.faces, np.int64), col, uv, tex_id))

    for v, f, *_ in recs:
        if f.size and (f.min() < 0 or f.max() >= len(v)):
            raise ValueError(f"{path}: face indices out of range [0, {len(v)}) (min {f.min()}, max {f.max()})")

    if not images:
        verts, faces, cols, off = [], [], [], 0
        for v, f, c, _, _ in recs:
            verts.append(v); faces.append(f + off); cols.append(c); off += len(v)
        mesh = mesh_from_arrays(np.concatenate(verts), np.concatenate(faces), np.concatenate(cols),
                                name=path.stem, source=str(path))
    else:
        mesh = _merge_textured(recs, images, path)
    return normalize(mesh) if normalize_to_unit_cube else mesh


def _merge_textured(recs, images, path: Path) -> Mesh:
    """Merge parts when at least one is textured: per-corner vertices, one (atlas) texture."""
    texs = [_image_to_linear(im) for im in images]
    single = len(texs) == 1 and all(r[4] is not None for r in recs)
    if single:
        atlas = texs[0]
        cells = [(0.0, 0.0, 1.0, 1.0)]
        white = None
        th, tw = atlas.shape[:2]
    else:
        from PIL import Image

        ch = max(t.shape[0] for t in texs)
        cw = max(t.shape[1] for t in texs)
        n = len(texs) + 1  # + white cell
        ncol = int(np.ceil(np.sqrt(n)))
        nrow = int(np.ceil(n / ncol))
        th, tw = nrow * ch, ncol * cw
        atlas = np.ones((th, tw, 3), np.float32)
        cells = []
        for k, t in enumerate(texs):
            r, c = divmod(k, ncol)
            if t.shape[:2] != (ch, cw):
                t = np.stack([np.asarray(Image.fromarray(t[..., i]).resize((cw, ch), Image.BILINEAR))
                              for i in range(3)], -1)
            atlas[r * ch:(r + 1) * ch, c * cw:(c + 1) * cw] = t
            cells.append((c * cw, r * ch, cw, ch))
        r, c = divmod(len(texs), ncol)
        white = ((c * cw + cw / 2) / tw, (r * ch + ch / 2) / th)
    verts, faces, cols, uvs = [], [], [], []
    off = 0
    for v, f, col, uv, tid in recs:
        nf = len(f)
        verts.append(v[f].reshape(-1, 3))
        cols.append(col[f].reshape(-1, 3))
        if tid is None:
            uvs.append(np.broadcast_to(np.asarray(white, np.float64), (nf * 3, 2)))
        elif single:
            uvs.append(_wrap_uv_per_face(uv, f).reshape(-1, 2))
        else:
            x0, y0, cw_, ch_ = cells[tid]
            fuv = _wrap_uv_per_face(uv, f).reshape(-1, 2)
            u = (x0 + 0.5 + fuv[:, 0] * (cw_ - 1)) / tw
            vv = (y0 + 0.5 + fuv[:, 1] * (ch_ - 1)) / th
            uvs.append(np.stack([u, vv], -1))
        faces.append(np.arange(nf * 3).reshape(nf, 3) + off)
        off += nf * 3
    return mesh_from_arrays(np.concatenate(verts), np.concatenate(faces), np.concatenate(cols),
                            np.concatenate(uvs), atlas, name=path.stem, source=str(path))


def load_exemplars(source) -> list[Mesh]:
    """Exemplar meshes from a directory (every GLB/glTF/OBJ in it, sorted by name) or a built-in theme
    (``"builtin"`` = default theme, ``"builtin:<name>"``). All meshes are normalised."""
    src = str(source)
    if src == "builtin" or src.startswith("builtin:"):
        from tsjax.data import builtin

        name = src.split(":", 1)[1] if ":" in src else builtin.DEFAULT_THEME
        return builtin.builtin_theme(name)
    d = Path(src)
    if not d.exists():
        raise FileNotFoundError(f"{d}: exemplar directory does not exist")
    if d.is_file():
        return [load_mesh(d)]
    files = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() in MESH_SUFFIXES)
    if not files:
        raise ValueError(f"{d}: no mesh files ({', '.join(MESH_SUFFIXES)}) in the exemplar directory")
    return [load_mesh(p) for p in files]
