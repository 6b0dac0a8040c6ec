"""Camera conventions: look-at, projections, orbit parameterisation, sampling ranges."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tsjax.render import camera as C


def test_look_at_is_rotation_and_points_at_target():
    eye = jnp.array([[1.0, 2.0, 3.0], [0.0, 5.0, 0.0], [-2.0, 0.1, 0.3]])
    target = jnp.array([0.1, -0.2, 0.3])
    m = np.asarray(C.look_at(eye, target))
    for i in range(3):
        r = m[i, :3, :3]
        np.testing.assert_allclose(r.T @ r, np.eye(3), atol=1e-5)
        assert np.linalg.det(r) == pytest.approx(1.0, abs=1e-5)
        fwd = -r[:, 2]
        d = np.asarray(target - eye[i])
        np.testing.assert_allclose(fwd, d / np.linalg.norm(d), atol=1e-5)
    # straight down still gives a proper rotation (degenerate up)
    assert np.all(np.isfinite(m[1]))


def test_target_projects_to_ndc_centre_and_depth_in_range():
    cams = C.make_cameras(20.0, 30.0, 1.6, fovy=75.0)
    clip = np.asarray(C.world_to_clip(jnp.array([[0.0, 0.0, 0.0], [0.0, 0.5, 0.0]]), cams))[0]
    ndc = clip[:, :3] / clip[:, 3:]
    np.testing.assert_allclose(ndc[0, :2], 0.0, atol=1e-5)
    assert -1 < ndc[0, 2] < 1
    assert ndc[1, 1] > 0  # +Y world is up in the image


def test_orbit_conventions():
    # azimuth 0 -> camera on +Z, 90 -> on +X, elevation 90 -> above (+Y)
    pos = np.asarray(C.orbit_c2w(jnp.array([0.0, 0.0, 89.9]), jnp.array([0.0, 90.0, 0.0]), 2.0))[:, :3, 3]
    np.testing.assert_allclose(pos[0], [0, 0, 2], atol=1e-5)
    np.testing.assert_allclose(pos[1], [2, 0, 0], atol=1e-5)
    assert pos[2, 1] == pytest.approx(2.0, abs=1e-3)
    # a point on +X appears on the right of the image of the front camera
    cams = C.make_cameras(0.0, 0.0, 2.0, fovy=60.0)
    clip = np.asarray(C.world_to_clip(jnp.array([[0.3, 0.0, 0.0]]), cams))[0, 0]
    assert clip[0] / clip[3] > 0


def test_orthographic_maps_half_height_to_unit():
    cams = C.make_cameras(0.0, 0.0, 2.0, ortho_half_height=0.5)
    clip = np.asarray(C.world_to_clip(jnp.array([[0.0, 0.5, 0.0], [0.25, 0.0, 0.0]]), cams))[0]
    np.testing.assert_allclose(clip[:, 3], 1.0)
    np.testing.assert_allclose(clip[0, 1], 1.0, atol=1e-6)
    np.testing.assert_allclose(clip[1, 0], 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly one"):
        C.make_cameras(0.0, 0.0, 2.0)


def test_sample_orbit_ranges_and_determinism():
    cams, p = C.sample_orbit_cameras(jax.random.key(3), 256)
    assert cams.c2w.shape == (256, 4, 4) and cams.proj.shape == (256, 4, 4)
    for k, (lo, hi) in {"elevation": (-5, 30), "azimuth": (-180, 180), "distance": (1.4, 1.8), "fovy": (70, 80)}.items():
        v = np.asarray(p[k])
        assert v.min() >= lo and v.max() <= hi and v.max() - v.min() > 0.8 * (hi - lo)
    dist = np.linalg.norm(np.asarray(cams.position), axis=-1)
    np.testing.assert_allclose(dist, np.asarray(p["distance"]), rtol=1e-5)
    cams2, _ = C.sample_orbit_cameras(jax.random.key(3), 256)
    np.testing.assert_array_equal(np.asarray(cams.c2w), np.asarray(cams2.c2w))
    cond = C.camera_condition(cams)
    assert cond.shape == (256, 16)


def test_view_direction_names():
    assert C.view_direction_names([0, 0, 0, 70], [10, 90, -170, 0]) == ["front", "side", "back", "overhead"]
