"""Shading helpers: sRGB transfer round trip, normal encoding, face/vertex normals, compositing."""
import jax.numpy as jnp
import numpy as np

from tsjax.render import shading as S


def test_srgb_roundtrip_and_known_values():
    x = jnp.linspace(0.0, 1.0, 101)
    np.testing.assert_allclose(S.srgb_to_linear(S.linear_to_srgb(x)), x, atol=1e-5)
    assert float(S.linear_to_srgb(0.5)) == np.float32(0.7353569830524495).item() or \
        abs(float(S.linear_to_srgb(0.5)) - 0.735357) < 1e-5
    assert abs(float(S.srgb_to_linear(0.5)) - 0.214041) < 1e-5


def test_normals_and_composite():
    v = jnp.array([[0.0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1]])
    f = jnp.array([[0, 1, 2], [0, 2, 3]])  # ccw seen from +z ; second faces +x
    fn = np.asarray(S.face_normals(v, f))
    np.testing.assert_allclose(fn, [[0, 0, 1], [1, 0, 0]], atol=1e-6)
    vn = np.asarray(S.vertex_normals(v, f))
    np.testing.assert_allclose(vn[1], [0, 0, 1], atol=1e-6)
    np.testing.assert_allclose(vn[0], np.array([1, 0, 1]) / np.sqrt(2), atol=1e-6)
    np.testing.assert_allclose(S.normals_to_rgb(jnp.array([0.0, 0, 1])), [0.5, 0.5, 1.0])
    out = S.composite(jnp.ones((2, 2, 3)) * 0.2, jnp.array([[[1.0], [0.0]], [[0.5], [0.0]]]), (1, 0, 0))
    np.testing.assert_allclose(out[0, 1], [1, 0, 0]); np.testing.assert_allclose(out[1, 0], [0.6, 0.1, 0.1])
