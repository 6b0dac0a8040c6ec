"""tsjax.data.renders: paper / ortho exemplar cameras and batched renders."""
import jax
import numpy as np
import pytest

from tsjax.data.builtin import builtin_theme
from tsjax.data.renders import exemplar_cameras, render_exemplar_views
from tsjax.render.camera import orbit_c2w


def test_paper_and_ortho_cameras():
    cams, p = exemplar_cameras(jax.random.key(0), 20)
    assert set(np.unique(p["elevation"])) == {0.0, 20.0} and (p["elevation"] == 0).sum() == 10
    assert p["azimuth"].min() >= -180 and p["azimuth"].max() < 180 and np.ptp(p["azimuth"]) > 90
    np.testing.assert_allclose(cams.c2w, orbit_c2w(p["elevation"], p["azimuth"], p["distance"]), atol=1e-6)
    oc, op = exemplar_cameras(jax.random.key(0), 30, mode="ortho")
    np.testing.assert_allclose(np.sort((op["azimuth"] + 360) % 360), np.arange(30) * 12.0, atol=1e-4)
    assert np.isnan(op["fovy"]).all() and np.allclose(oc.proj[:, 3], [0, 0, 0, 1])
    with pytest.raises(ValueError, match="mode"):
        exemplar_cameras(jax.random.key(0), 4, mode="fisheye")


def test_render_exemplar_views_shapes_and_content():
    meshes = builtin_theme("toy-rockets")[:2]
    calls = []
    r = render_exemplar_views(meshes, 3, 24, jax.random.key(1), progress=calls.append)
    assert calls == [0, 1]
    assert r["color"].shape == (2, 3, 24, 24, 3) and r["normal"].shape == (2, 3, 24, 24, 3)
    assert r["mask"].shape == (2, 3, 24, 24, 1) and r["cams"].c2w.shape == (2, 3, 4, 4)
    assert r["params"]["azimuth"].shape == (2, 3)
    cover = r["mask"].mean(axis=(2, 3, 4))
    assert np.all(cover > 0.03) and np.all(cover < 0.6)  # object in frame, not clipped
    assert np.all(r["mask"][:, :, 0, :, 0] < 1e-3)  # top row is background (object fits the frame)
    assert not np.allclose(r["cams"].c2w[0], r["cams"].c2w[1])  # each mesh has its own azimuths
