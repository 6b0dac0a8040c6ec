"""tsjax.data.builtin: deterministic, varied, palette-sharing procedural themes; load_exemplars."""
import numpy as np
import pytest

from tsjax.data.builtin import DEFAULT_THEME, THEMES, builtin_theme
from tsjax.data.mesh import load_exemplars


def test_themes_are_deterministic_and_well_formed():
    assert len(THEMES) >= 2 and DEFAULT_THEME in THEMES
    for t in THEMES:
        a, b = builtin_theme(t, seed=0), builtin_theme(t, seed=0)
        assert 3 <= len(a) <= 4
        for m, n in zip(a, b):
            np.testing.assert_array_equal(m.vertices, n.vertices)
            np.testing.assert_array_equal(m.colors, n.colors)
            assert m.dropped_faces == 0 and m.num_faces >= 12
            assert np.ptp(m.vertices, 0).max() == pytest.approx(1.0, abs=1e-5)
            assert len(np.unique(np.round(m.colors, 4), axis=0)) >= 3
        # varied shapes within a set, shared palette across the set
        exts = np.array([np.ptp(m.vertices, 0) for m in a])
        assert len({m.num_faces for m in a}) > 1 or np.ptp(exts, 0).max() > 0.05
        palettes = [set(map(tuple, np.round(m.colors, 4))) for m in a]
        assert len(set.intersection(*palettes)) >= 1
        c = builtin_theme(t, seed=1)
        assert any(m.vertices.shape != n.vertices.shape or not np.allclose(m.vertices, n.vertices)
                   for m, n in zip(a, c))


def test_parts_are_closed():
    # every primitive part is watertight: each edge is used an even number of times
    for t in THEMES:
        for m in builtin_theme(t):
            e = np.sort(m.faces[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
            _, counts = np.unique(e, axis=0, return_counts=True)
            assert np.all(counts % 2 == 0), m.name


def test_load_exemplars_builtin_names():
    assert [m.name for m in load_exemplars("builtin")] == [m.name for m in builtin_theme(DEFAULT_THEME)]
    assert len(load_exemplars("builtin:mushrooms")) == len(builtin_theme("mushrooms"))
    with pytest.raises(ValueError, match="unknown built-in theme 'nope'"):
        load_exemplars("builtin:nope")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_exemplars("/definitely/not/here")
