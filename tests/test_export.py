"""GLB/OBJ export: Khronos validator, reload (trimesh, tsjax loader), baked colours, seams, errors."""
from __future__ import annotations

import inspect
import io
import json
import shutil
import struct
import subprocess
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from tsjax.export import bake_texture, export_glb, export_obj
from tsjax.geometry import build_tet_grid, compact_mesh, marching_tets

VALIDATOR = Path(__file__).resolve().parents[1] / ".npm" / "node_modules" / "gltf-validator"


def _albedo(p):
    return 0.5 + 0.8 * p  # sRGB, linear in position, in [0.1, 0.9] inside the unit cube


@pytest.fixture(scope="module")
def mesh():
    g = build_tet_grid(16)
    m = marching_tets(g.verts, np.linalg.norm(g.verts * [1.0, 1.4, 1.0], axis=1) - 0.3, g, max_faces=5000)
    return compact_mesh(m)


def _validate(path: Path) -> dict:
    if shutil.which("node") is None:
        pytest.skip("node is not installed: cannot run the Khronos glTF validator")
    if not (VALIDATOR / "package.json").is_file():
        pytest.skip(f"gltf-validator not installed at {VALIDATOR} (run `make validator`)")
    js = (f"const v=require({json.dumps(str(VALIDATOR))});const fs=require('fs');"
          f"v.validateBytes(new Uint8Array(fs.readFileSync({json.dumps(str(path))})))"
          ".then(r=>{console.log(JSON.stringify(r.issues));}).catch(e=>{console.error(String(e));process.exit(1);});")
    res = subprocess.run(["node", "-e", js], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout)


def _glb_parts(path: Path) -> tuple[dict, bytes]:
    """(JSON chunk, BIN chunk) of a GLB file, read with struct (independent of the writer)."""
    data = path.read_bytes()
    magic, version, total = struct.unpack_from("<III", data, 0)
    assert (magic, version, total) == (0x46546C67, 2, len(data))
    jlen, jtype = struct.unpack_from("<II", data, 12)
    assert jtype == 0x4E4F534A
    gltf = json.loads(data[20:20 + jlen])
    blen, btype = struct.unpack_from("<II", data, 20 + jlen)
    assert btype == 0x004E4942
    return gltf, data[28 + jlen:28 + jlen + blen]


def _accessor(gltf: dict, binary: bytes, i: int) -> np.ndarray:
    acc = gltf["accessors"][i]
    view = gltf["bufferViews"][acc["bufferView"]]
    assert acc["componentType"] == 5126  # float32
    width = {"VEC2": 2, "VEC3": 3}[acc["type"]]
    raw = binary[view["byteOffset"]:view["byteOffset"] + view["byteLength"]]
    return np.frombuffer(raw, np.float32).reshape(acc["count"], width)


def test_glb_is_valid_and_reloads(mesh, tmp_path):
    v, f = mesh
    path = tmp_path / "out" / "m.glb"
    assert inspect.signature(export_glb).parameters["texture_size"].default == 1024
    baked = export_glb(path, v, f, _albedo)  # default texture size
    issues = _validate(path)
    assert issues["numErrors"] == 0, issues["messages"]
    assert issues["numWarnings"] == 0, issues["messages"]
    tm = trimesh.load(path, force="mesh", process=False)
    assert len(tm.faces) == len(f)
    np.testing.assert_allclose(np.sort(np.unique(np.round(tm.vertices, 5), axis=0), 0),
                               np.sort(np.unique(np.round(v, 5), axis=0), 0), atol=1e-5)
    # same geometry and winding as the input (positive volume = outward normals kept)
    assert tm.volume == pytest.approx(trimesh.Trimesh(v, f, process=False).volume, rel=1e-5) and tm.volume > 0
    # the project's own loader reads the texture back (sRGB -> linear) with the same uv convention
    from tsjax.data.mesh import load_mesh
    from tsjax.render.shading import srgb_to_linear

    lm = load_mesh(path, normalize_to_unit_cube=False)
    assert lm.num_faces == len(f) and lm.texture is not None
    np.testing.assert_allclose(lm.texture, np.asarray(srgb_to_linear(np.round(baked.texture * 255) / 255)),
                               atol=2e-3)
    np.testing.assert_allclose(lm.uv[lm.faces], baked.uv[baked.faces], atol=1e-6)  # per corner
    # the file holds a 1024 x 1024 texture and unit vertex normals that point outwards (ellipsoid)
    gltf, binary = _glb_parts(path)
    prim = gltf["meshes"][0]["primitives"][0]
    view = gltf["bufferViews"][gltf["images"][0]["bufferView"]]
    png = Image.open(io.BytesIO(binary[view["byteOffset"]:view["byteOffset"] + view["byteLength"]]))
    assert png.size == (1024, 1024) and png.mode == "RGB" and baked.texture.shape == (1024, 1024, 3)
    pos = _accessor(gltf, binary, prim["attributes"]["POSITION"])
    nrm = _accessor(gltf, binary, prim["attributes"]["NORMAL"])
    assert nrm.shape == pos.shape
    np.testing.assert_allclose(np.linalg.norm(nrm, axis=1), 1.0, atol=1e-5)
    grad = pos * np.array([1.0, 1.4 ** 2, 1.0], np.float32)  # gradient of the ellipsoid's implicit function
    cos = np.sum(nrm * grad, 1) / np.linalg.norm(grad, axis=1)
    assert cos.min() > 0.9 and np.median(cos) > 0.995


def test_baked_colours_match_field_and_seams_are_dilated(mesh):
    v, f = mesh
    t = 256
    b = bake_texture(v, f, _albedo, t)
    assert b.faces.shape == f.shape and (b.vmapping.max() < len(v))
    np.testing.assert_array_equal(b.vmapping[b.faces], f)  # same triangles, same order and winding
    assert (b.uv >= 0).all() and (b.uv <= 1).all()
    # colour at each face centroid's texel = the field at the centroid's 3D position
    c_uv = b.uv[b.faces].mean(1)
    c_xyz = b.verts[b.faces].mean(1)
    tex = b.texture[np.clip((c_uv[:, 1] * t).astype(int), 0, t - 1), np.clip((c_uv[:, 0] * t).astype(int), 0, t - 1)]
    err = np.abs(tex - _albedo(c_xyz))
    assert np.median(err) < 0.005 and err.max() < 0.03
    assert 0.2 < b.coverage.mean() < 0.95
    assert b.texture[~b.coverage].min() > 0.05  # every uncovered texel got a neighbour's colour
    np.testing.assert_allclose(np.linalg.norm(b.normals, axis=1), 1.0, atol=1e-5)
    # per-vertex colours instead of a field
    bv = bake_texture(v, f, _albedo(v), 64)
    assert bv.texture.shape == (64, 64, 3) and abs(bv.texture[bv.coverage].mean() - 0.5) < 0.05


def test_obj_mtl_png(mesh, tmp_path):
    v, f = mesh
    b = export_obj(tmp_path / "m.obj", v, f, _albedo, texture_size=128)
    assert (tmp_path / "m.mtl").is_file() and (tmp_path / "m_albedo.png").is_file()
    assert "map_Kd m_albedo.png" in (tmp_path / "m.mtl").read_text()
    tm = trimesh.load(tmp_path / "m.obj", process=False, maintain_order=True)
    assert len(tm.faces) == len(f) and tm.visual.kind == "texture"
    # OBJ stores v flipped: trimesh returns OBJ's vt, so 1 - vt_v = our v
    np.testing.assert_allclose(tm.visual.uv[:, 1], 1.0 - b.uv[:, 1], atol=1e-6)
    assert np.asarray(tm.visual.material.image).shape == (128, 128, 3)


def test_bad_input(mesh, tmp_path):
    v, f = mesh
    with pytest.raises(ValueError, match="no faces"):
        export_glb(tmp_path / "e.glb", v, np.zeros((0, 3), np.int32), _albedo)
    with pytest.raises(ValueError, match=r"\.glb"):
        export_glb(tmp_path / "e.gltf", v, f, _albedo)
    with pytest.raises(ValueError, match="per-vertex colours"):
        bake_texture(v, f, np.ones((3, 3)), 64)
    with pytest.raises(ValueError, match="texture_size"):
        bake_texture(v, f, _albedo, 3)
