"""tsjax.data.mesh: loading the real exemplar sets and synthetic files, validation errors."""
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from tsjax.data.mesh import load_exemplars, load_mesh, mesh_from_arrays, normalize

SETS = ["medieval-house", "dinosaur", "city-building", "spaceship"]


@pytest.fixture(scope="module")
def loaded(exemplars_root):
    return {s: {p.name: load_mesh(p) for p in sorted((exemplars_root / s).glob("*.glb"))} for s in SETS}


def _trimesh_faces(path):
    """(all faces, zero-area faces) as trimesh counts them over the flattened scene."""
    geoms = trimesh.load(str(path), force="scene").dump(concatenate=False)
    return sum(len(g.faces) for g in geoms), sum(int((~g.nondegenerate_faces()).sum()) for g in geoms)


def test_triangle_counts_match_trimesh_and_unit_cube(loaded, exemplars_root):
    for s in SETS:
        assert len(loaded[s]) >= 3, s
        for name, m in loaded[s].items():
            total, degenerate = _trimesh_faces(exemplars_root / s / name)
            assert (m.num_faces, m.dropped_faces) == (total - degenerate, degenerate), name
            lo, hi = m.bounds()
            np.testing.assert_allclose((lo + hi) / 2, 0.0, atol=1e-5)
            assert np.max(hi - lo) == pytest.approx(1.0, abs=1e-5)
            assert m.vertices.dtype == np.float32 and m.faces.dtype == np.int32
            assert m.faces.max() < m.num_vertices and np.isfinite(m.vertices).all()


def test_dinosaurs_are_elongated(loaded):
    for name, m in loaded["dinosaur"].items():
        ext = np.sort(np.ptp(m.vertices, axis=0))
        assert ext[2] / ext[0] > 3.0, (name, ext)


def test_city_building_external_texture(loaded):
    for name, m in loaded["city-building"].items():
        assert m.texture is not None and m.uv is not None, name
        assert m.texture.shape[2] == 3 and m.texture.std() > 0.05  # a real palette, not constant
        assert 0.0 <= m.uv.min() and m.uv.max() <= 1.0
        # colours sampled at the mesh's uvs are varied (the building uses several palette cells)
        th, tw = m.texture.shape[:2]
        px = m.texture[np.clip((m.uv[:, 1] * th).astype(int), 0, th - 1), np.clip((m.uv[:, 0] * tw).astype(int), 0, tw - 1)]
        assert len(np.unique(np.round(px, 2), axis=0)) >= 3


def test_spaceship_embedded_textures(loaded):
    for name, m in loaded["spaceship"].items():
        assert m.texture is not None and m.texture.std() > 0.02, name
        assert m.texture.max() <= 1.0 and m.texture.min() >= 0.0


def test_medieval_house_materials(loaded):
    for name, m in loaded["medieval-house"].items():
        assert m.texture is None
        assert len(np.unique(np.round(m.colors, 4), axis=0)) >= 5, name
        assert m.colors.max() <= 1.0  # linear factors in [0, 1]


def _write_obj(tmp_path, verts, faces, vt=None, tex=None, name="m"):
    lines = []
    if tex is not None:
        Image.fromarray(tex).save(tmp_path / "tex.png")
        (tmp_path / f"{name}.mtl").write_text("newmtl mat\nKd 1 1 1\nmap_Kd tex.png\n")
        lines += [f"mtllib {name}.mtl", "usemtl mat"]
    lines += [f"v {x} {y} {z}" for x, y, z in verts]
    if vt is not None:
        lines += [f"vt {u} {v}" for u, v in vt]
        lines += [f"f {a+1}/{a+1} {b+1}/{b+1} {c+1}/{c+1}" for a, b, c in faces]
    else:
        lines += [f"f {a+1} {b+1} {c+1}" for a, b, c in faces]
    p = tmp_path / f"{name}.obj"
    p.write_text("\n".join(lines) + "\n")
    return p


def test_obj_texture_v_flip_and_srgb_decode(tmp_path):
    tex = np.zeros((4, 4, 3), np.uint8)
    tex[0, 0] = (255, 0, 0)  # top-left texel red
    tex[3, 3] = (0, 0, 255)
    tex[1:3, :] = 128
    verts = [(0, 0, 0), (1, 0, 0), (0, 1, 0)]
    p = _write_obj(tmp_path, verts, [(0, 1, 2)], vt=[(0.1, 0.9), (0.9, 0.1), (0.1, 0.1)], tex=tex)
    m = load_mesh(p, normalize_to_unit_cube=False)
    assert m.texture is not None
    # OBJ vt (0.1, 0.9) is near the image top -> glTF-convention v = 0.1
    np.testing.assert_allclose(m.uv[0], [0.1, 0.1], atol=1e-6)
    np.testing.assert_allclose(m.texture[0, 0], [1, 0, 0])
    np.testing.assert_allclose(m.texture[1, 0], ((128 / 255 + 0.055) / 1.055) ** 2.4, rtol=1e-5)  # sRGB decoded


def test_multiple_textures_pack_into_atlas(tmp_path):
    scene = trimesh.Scene()
    cols = [(255, 0, 0), (0, 0, 255)]
    for k, c in enumerate(cols):
        img = Image.new("RGB", (8, 8), c)
        box = trimesh.creation.box((1, 1, 1))
        uv = np.random.default_rng(k).uniform(0, 1, (len(box.vertices), 2))
        box.visual = trimesh.visual.TextureVisuals(uv=uv, image=img)
        box.apply_translation((2.0 * k, 0, 0))
        scene.add_geometry(box, geom_name=f"b{k}")
    plain = trimesh.creation.box((1, 1, 1))
    plain.apply_translation((4.0, 0, 0))
    scene.add_geometry(plain, geom_name="plain")
    p = tmp_path / "two.glb"
    scene.export(str(p))
    m = load_mesh(p)
    assert m.texture is not None and m.num_faces == 36
    th, tw = m.texture.shape[:2]
    px = m.texture[(m.uv[:, 1] * th).astype(int), (m.uv[:, 0] * tw).astype(int)]
    x = m.vertices[:, 0]
    assert np.allclose(px[x < -0.2], [1, 0, 0], atol=1e-3)  # red box (leftmost) keeps its own texture
    mid = (x > -0.15) & (x < 0.15)
    assert np.allclose(px[mid], [0, 0, 1], atol=1e-3)
    assert np.allclose(px[x > 0.2] * m.colors[x > 0.2], m.colors[x > 0.2], atol=1e-3)  # white cell


def test_zero_area_faces_dropped_and_errors(tmp_path):
    p = _write_obj(tmp_path, [(0, 0, 0), (1, 0, 0), (0, 1, 0), (2, 0, 0)], [(0, 1, 2), (0, 1, 3)])
    m = load_mesh(p)
    assert m.num_faces == 1 and m.dropped_faces == 1
    with pytest.raises(FileNotFoundError, match="missing.glb"):
        load_mesh(tmp_path / "missing.glb")
    (tmp_path / "a.ply2").write_text("x")
    with pytest.raises(ValueError, match="unsupported"):
        load_mesh(tmp_path / "a.ply2")
    (tmp_path / "bad.glb").write_bytes(b"glTF\x02\x00\x00\x00garbage")
    with pytest.raises(ValueError, match="bad.glb"):
        load_mesh(tmp_path / "bad.glb")
    with pytest.raises(ValueError, match="NaN"):
        mesh_from_arrays([[0, 0, 0], [1, np.nan, 0], [0, 1, 0]], [[0, 1, 2]], source="x.obj")
    with pytest.raises(ValueError, match="out of range"):
        mesh_from_arrays([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 3]], source="x.obj")
    with pytest.raises(ValueError, match="no triangles"):
        mesh_from_arrays(np.zeros((3, 3)), np.zeros((0, 3), int), source="x.obj")
    with pytest.raises(ValueError, match="no mesh files"):
        load_exemplars(_empty(tmp_path))


def _empty(tmp_path):
    d = tmp_path / "empty"
    d.mkdir()
    (d / "notes.txt").write_text("no meshes")
    return d


def test_normalize_unit_cube():
    m = mesh_from_arrays([[1, 1, 1], [5, 1, 1], [1, 3, 2]], [[0, 1, 2]])
    n = normalize(m)
    np.testing.assert_allclose(n.bounds(), [[-0.5, -0.25, -0.125], [0.5, 0.25, 0.125]], atol=1e-6)


def test_obj_mtl_materials_are_per_vertex_linear_colours(tmp_path):
    (tmp_path / "two.mtl").write_text("newmtl a\nKd 1 0 0\nnewmtl b\nKd 0 0.5 1\n")
    (tmp_path / "two.obj").write_text(
        "mtllib two.mtl\nv 0 0 0\nv 1 0 0\nv 0 1 0\nv 2 0 0\nv 3 0 0\nv 2 1 0\n"
        "usemtl a\nf 1 2 3\nusemtl b\nf 4 5 6\n")
    m = load_mesh(tmp_path / "two.obj")
    assert m.num_faces == 2 and m.texture is None
    cols = {tuple(np.round(c, 2)) for c in m.colors[m.faces].reshape(-1, 3)}
    assert cols == {(1.0, 0.0, 0.0), (0.0, 0.5, 1.0)}


def test_gltf_vertex_colours(tmp_path):
    b = trimesh.creation.box((1, 1, 1))
    vc = np.zeros((len(b.vertices), 4), np.uint8)
    vc[:, 3] = 255
    vc[:, 0] = np.arange(len(b.vertices)) * 30
    b.visual = trimesh.visual.ColorVisuals(b, vertex_colors=vc)
    b.export(str(tmp_path / "vc.glb"))
    m = load_mesh(tmp_path / "vc.glb")
    # COLOR_0 is linear: kept as is (no sRGB decode), one value per vertex
    np.testing.assert_allclose(np.unique(np.round(m.colors[:, 0] * 255)), np.arange(8) * 30.0)
    np.testing.assert_allclose(m.colors[:, 1:], 0.0)
