"""Export a triangle mesh with a baked albedo texture: binary glTF (GLB) and OBJ + MTL + PNG.

Pipeline (:func:`bake_texture`):
  1. UV atlas with ``xatlas`` (charts packed with a 2-texel padding; vertices on chart seams are split,
     ``vmapping`` maps every atlas vertex to its source vertex).
  2. Bake: the atlas triangles are rasterized in UV space with :func:`tsjax.ops.rasterize` (clip position
     ``(2u - 1, 1 - 2v, 0, 1)``, so texel (row i, column j) is ``uv = ((j + .5)/W, (i + .5)/H)``: glTF
     convention, uv (0, 0) = first texel), the 3D positions are interpolated with
     :func:`tsjax.ops.interpolate` and the albedo is queried there (``albedo_fn``: world points [N, 3] ->
     **sRGB** [N, 3] in [0, 1], e.g. the DMTet material field; or per-vertex sRGB colours [V, 3]).
  3. Seam dilation: every texel no triangle covers takes the colour of the nearest covered texel
     (Euclidean distance transform), so bilinear filtering and mip-maps never bleed background in.
  4. Smooth area-weighted vertex normals computed on the source mesh (continuous across UV seams).

Files: GLB 2.0 with POSITION (+min/max), NORMAL, TEXCOORD_0, uint32 indices, one PBR material
(``baseColorTexture`` = the sRGB PNG, metallic 0, roughness 1) and one node; the mesh is written in the
tsjax world frame (glTF: +Y up, metres). OBJ: ``v``/``vt``/``vn``/``f`` with OBJ's flipped v
(``vt = (u, 1 - v)``), an MTL with ``map_Kd`` and the PNG next to it.
"""
from __future__ import annotations

import io
import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["BakedMesh", "bake_texture", "export_glb", "export_obj"]


@dataclass(frozen=True)
class BakedMesh:
    """A UV-unwrapped mesh with its baked texture (numpy).

    Attributes:
      verts: [Va, 3] float32 atlas vertex positions (seam vertices duplicated).
      faces: [F, 3] int32 (same triangles, same order and winding as the input).
      uv: [Va, 2] float32 in [0, 1], glTF convention ((0, 0) = first texel, v down the rows).
      normals: [Va, 3] float32 unit vertex normals.
      texture: [T, T, 3] float32 sRGB in [0, 1].
      coverage: [T, T] bool, texels covered by a triangle before dilation.
      vmapping: [Va] int32 source vertex of every atlas vertex.
    """

    verts: np.ndarray
    faces: np.ndarray
    uv: np.ndarray
    normals: np.ndarray
    texture: np.ndarray
    coverage: np.ndarray
    vmapping: np.ndarray


def _check_mesh(verts, faces, where: str):
    v = np.asarray(verts, np.float32)
    f = np.asarray(faces)
    if v.ndim != 2 or v.shape[1] != 3 or f.ndim != 2 or f.shape[1] != 3:
        raise ValueError(f"{where}: verts must be [V,3] and faces [F,3], got {v.shape} and {f.shape}")
    if len(f) == 0:
        raise ValueError(f"{where}: the mesh has no faces (empty surface?)")
    if f.min() < 0 or f.max() >= len(v):
        raise ValueError(f"{where}: face indices out of range [0, {len(v)})")
    if not np.isfinite(v).all():
        raise ValueError(f"{where}: vertices contain NaN or inf")
    return v, f.astype(np.int32)


def _vertex_normals(v: np.ndarray, f: np.ndarray) -> np.ndarray:
    fn = np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]])  # length = 2 area
    acc = np.zeros_like(v, dtype=np.float64)
    for k in range(3):
        np.add.at(acc, f[:, k], fn)
    n = np.linalg.norm(acc, axis=1, keepdims=True)
    out = np.where(n > 1e-20, acc / np.maximum(n, 1e-20), np.array([0.0, 1.0, 0.0]))
    return out.astype(np.float32)


def _dilate(tex: np.ndarray, covered: np.ndarray) -> np.ndarray:
    from scipy.ndimage import distance_transform_edt

    if covered.all() or not covered.any():
        return tex
    _, (ii, jj) = distance_transform_edt(~covered, return_indices=True)
    return tex[ii, jj]


def bake_texture(verts, faces, albedo, texture_size: int = 1024, *, chunk: int = 1 << 18,
                 backend: str = "auto") -> BakedMesh:
    """UV-unwrap ``(verts [V,3], faces [F,3])`` and bake ``albedo`` into a texture (module docstring).

    Args:
      albedo: callable ``points [N,3] float32 -> sRGB [N,3]`` (evaluated in chunks of ``chunk`` points),
        or per-vertex sRGB colours [V, 3].
      texture_size: texture side in texels (square).
    """
    import jax
    import jax.numpy as jnp
    import xatlas

    from tsjax.ops import interpolate, rasterize

    v, f = _check_mesh(verts, faces, "bake_texture")
    if not isinstance(texture_size, (int, np.integer)) or not 4 <= texture_size <= 8192:
        raise ValueError(f"bake_texture: texture_size must be an int in [4, 8192], got {texture_size!r}")
    vcol = None
    if not callable(albedo):
        vcol = np.asarray(albedo, np.float32)
        if vcol.shape != v.shape:
            raise ValueError(f"bake_texture: albedo must be a callable or per-vertex colours [{len(v)}, 3], "
                             f"got shape {vcol.shape}")
    atlas = xatlas.Atlas()
    atlas.add_mesh(v, f.astype(np.uint32))
    pack = xatlas.PackOptions()
    pack.resolution = int(texture_size)
    pack.padding = 2
    atlas.generate(pack_options=pack)
    vmap, af, uv = atlas[0]
    vmap, af, uv = vmap.astype(np.int32), af.astype(np.int32), uv.astype(np.float32)
    av = v[vmap]

    t = int(texture_size)
    clip = np.stack([2 * uv[:, 0] - 1, 1 - 2 * uv[:, 1], np.zeros(len(uv)), np.ones(len(uv))], 1).astype(np.float32)
    rast = rasterize(jnp.asarray(clip), jnp.asarray(af), (t, t), backend=backend)
    attr = av if vcol is None else np.concatenate([av, vcol[vmap]], 1)
    pts, _ = interpolate(jnp.asarray(attr), rast, jnp.asarray(af))
    covered = np.asarray(rast[0, ..., 3] > 0)
    pts = np.asarray(pts[0])
    if vcol is None:
        flat = pts[..., :3].reshape(-1, 3)
        sel = np.nonzero(covered.reshape(-1))[0]
        fn = jax.jit(lambda x: jnp.asarray(albedo(x), jnp.float32))
        cols = np.zeros((len(flat), 3), np.float32)
        for s in range(0, len(sel), chunk):
            idx = sel[s:s + chunk]
            buf = np.zeros((chunk, 3), np.float32)  # fixed chunk shape: one compilation
            buf[: len(idx)] = flat[idx]
            cols[idx] = np.asarray(fn(jnp.asarray(buf)))[: len(idx)]
        tex = cols.reshape(t, t, 3)
    else:
        tex = pts[..., 3:6]
    tex = np.where(covered[..., None], np.clip(tex, 0.0, 1.0), 0.0).astype(np.float32)
    tex = _dilate(tex, covered)
    normals = _vertex_normals(v, f)[vmap]
    return BakedMesh(av.astype(np.float32), af, uv, normals, tex, covered, vmap)


def _png_bytes(tex: np.ndarray) -> bytes:
    from PIL import Image

    img = Image.fromarray(np.round(np.clip(tex, 0, 1) * 255).astype(np.uint8), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _pad4(b: bytes, fill: bytes = b"\x00") -> bytes:
    return b + fill * ((-len(b)) % 4)


def _glb_bytes(baked: BakedMesh, name: str) -> bytes:
    pos = np.ascontiguousarray(baked.verts, np.float32)
    nrm = np.ascontiguousarray(baked.normals, np.float32)
    uv = np.ascontiguousarray(baked.uv, np.float32)
    idx = np.ascontiguousarray(baked.faces, np.uint32).reshape(-1)
    png = _png_bytes(baked.texture)
    blobs = [pos.tobytes(), nrm.tobytes(), uv.tobytes(), idx.tobytes(), png]
    views, offset, body = [], 0, b""
    targets = [34962, 34962, 34962, 34963, None]
    for blob, target in zip(blobs, targets):
        view = {"buffer": 0, "byteOffset": offset, "byteLength": len(blob)}
        if target is not None:
            view["target"] = target
        views.append(view)
        body += _pad4(blob)
        offset = len(body)
    n = len(pos)
    gltf = {
        "asset": {"version": "2.0", "generator": "tsjax.export"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0, "name": name}],
        "meshes": [{"name": name, "primitives": [{
            "attributes": {"POSITION": 0, "NORMAL": 1, "TEXCOORD_0": 2}, "indices": 3, "material": 0, "mode": 4}]}],
        "materials": [{"name": f"{name}_material", "pbrMetallicRoughness": {
            "baseColorTexture": {"index": 0}, "metallicFactor": 0.0, "roughnessFactor": 1.0}}],
        "textures": [{"sampler": 0, "source": 0}],
        "samplers": [{"magFilter": 9729, "minFilter": 9987, "wrapS": 33071, "wrapT": 33071}],
        "images": [{"bufferView": 4, "mimeType": "image/png"}],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": n, "type": "VEC3",
             "min": pos.min(0).tolist(), "max": pos.max(0).tolist()},
            {"bufferView": 1, "componentType": 5126, "count": n, "type": "VEC3"},
            {"bufferView": 2, "componentType": 5126, "count": n, "type": "VEC2"},
            {"bufferView": 3, "componentType": 5125, "count": int(idx.size), "type": "SCALAR"},
        ],
        "bufferViews": views,
        "buffers": [{"byteLength": len(body)}],
    }
    js = _pad4(json.dumps(gltf, separators=(",", ":")).encode("utf-8"), b" ")
    total = 12 + 8 + len(js) + 8 + len(body)
    return (struct.pack("<III", 0x46546C67, 2, total) + struct.pack("<II", len(js), 0x4E4F534A) + js
            + struct.pack("<II", len(body), 0x004E4942) + body)


def export_glb(path, verts, faces, albedo, texture_size: int = 1024, *, name: str = "tsjax_mesh",
               backend: str = "auto") -> BakedMesh:
    """Write a textured binary glTF (GLB) file; returns the :class:`BakedMesh` written.

    Args:
      path: output ``.glb`` path (parent folders are created).
      verts, faces: [V, 3] float32 world positions (tsjax frame) and [F, 3] int CCW triangles.
      albedo: callable ``points [N,3] -> sRGB [N,3]`` or per-vertex sRGB colours [V, 3].
      texture_size: baked texture side (texels).
    """
    path = Path(path)
    if path.suffix.lower() != ".glb":
        raise ValueError(f"export_glb: path must end in .glb, got {str(path)!r}")
    baked = bake_texture(verts, faces, albedo, texture_size, backend=backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_glb_bytes(baked, name))
    return baked


def export_obj(path, verts, faces, albedo, texture_size: int = 1024, *, name: str = "tsjax_mesh",
               backend: str = "auto") -> BakedMesh:
    """Write ``<stem>.obj``, ``<stem>.mtl`` and ``<stem>_albedo.png`` (sRGB); returns the :class:`BakedMesh`.

    Same arguments as :func:`export_glb`; ``path`` must end in ``.obj``.
    """
    path = Path(path)
    if path.suffix.lower() != ".obj":
        raise ValueError(f"export_obj: path must end in .obj, got {str(path)!r}")
    baked = bake_texture(verts, faces, albedo, texture_size, backend=backend)
    path.parent.mkdir(parents=True, exist_ok=True)
    mtl, png = path.with_suffix(".mtl"), path.with_name(path.stem + "_albedo.png")
    png.write_bytes(_png_bytes(baked.texture))
    mtl.write_text(f"newmtl {name}_material\nKa 1 1 1\nKd 1 1 1\nKs 0 0 0\nillum 1\nmap_Kd {png.name}\n")
    out = io.StringIO()
    out.write(f"# tsjax.export\nmtllib {mtl.name}\no {name}\n")
    np.savetxt(out, baked.verts, fmt="v %.7g %.7g %.7g")
    np.savetxt(out, np.stack([baked.uv[:, 0], 1.0 - baked.uv[:, 1]], 1), fmt="vt %.7g %.7g")
    np.savetxt(out, baked.normals, fmt="vn %.7g %.7g %.7g")
    out.write(f"usemtl {name}_material\n")
    f1 = baked.faces.astype(np.int64) + 1
    np.savetxt(out, np.repeat(f1, 3, axis=1), fmt="f %d/%d/%d %d/%d/%d %d/%d/%d")
    path.write_text(out.getvalue())
    return baked
