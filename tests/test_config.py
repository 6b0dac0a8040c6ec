"""Config dataclasses, presets and ``--set`` overrides."""
import dataclasses

import pytest

from tsjax.config import (GUIDANCE_MODES, Config, GuidanceConfig, apply_overrides, flat_keys, guidance_t_ranges,
                          load_config, to_dict)


def test_defaults_follow_method_notes():
    c = Config()
    assert (c.guidance.alpha, c.guidance.beta) == (0.2, 1.0)
    assert c.guidance.high_t == (0.5, 0.75) and c.guidance.low_t == (0.1, 0.25)
    assert (c.optim.b1, c.optim.b2, c.optim.eps) == (0.9, 0.99, 1e-15)
    assert (c.reg.tv, c.reg.sdf_sparsity, c.reg.opacity, c.reg.opacity_ramp_steps, c.reg.normal_consistency) == (
        8e-4, 10.0, 1000.0, 2500, 400.0)
    assert c.guidance.contextual_weight == 100.0 and c.guidance.lora_rank == 4
    assert c.camera.elevation == (-5.0, 30.0) and c.camera.fovy == (70.0, 80.0)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.steps = 3  # type: ignore[misc]


def test_overrides_coerce_types():
    c = apply_overrides(Config(), ["guidance.alpha=0.3", "steps=1e3", "guidance.contextual=false",
                                   "camera.fovy=60, 65", "data.class_name=owl", "guidance.mode=reverse"])
    assert c.guidance.alpha == 0.3 and isinstance(c.guidance.alpha, float)
    assert c.steps == 1000 and isinstance(c.steps, int)
    assert c.guidance.contextual is False
    assert c.camera.fovy == (60.0, 65.0)
    assert c.data.class_name == "owl" and c.guidance.mode == "reverse"
    # the original is untouched (frozen, functional update)
    assert Config().guidance.alpha == 0.2


@pytest.mark.parametrize("item, msg", [
    ("guidance.alhpa=0.3", "unknown config key; valid keys: .*guidance.alpha"),
    ("steps", "expected key=value"),
    ("steps=abc", "expected int"),
    ("guidance.contextual=maybe", "expected a boolean"),
    ("camera.fovy=1,2,3", "expected 2 comma-separated"),
    ("guidance.mode=bogus", "not one of concept_only"),
    ("guidance.low_t=0.5,0.1", "lo <= hi"),
])
def test_override_errors(item, msg):
    with pytest.raises(ValueError, match=msg):
        apply_overrides(Config(), [item])


def test_t_ranges_per_mode():
    g = GuidanceConfig()
    r = {m: guidance_t_ranges(dataclasses.replace(g, mode=m)) for m in GUIDANCE_MODES}
    assert r["dsd"] == {"concept": (0.5, 0.75), "reference": (0.1, 0.25)}
    assert r["reverse"] == {"concept": (0.1, 0.25), "reference": (0.5, 0.75)}
    assert r["concept_only"] == {"concept": (0.02, 0.98), "reference": None}
    assert r["naive"] == {"concept": (0.02, 0.98), "reference": (0.02, 0.98)}
    assert r["ref_dominated"] == {"concept": (0.5, 0.75), "reference": (0.02, 0.98)}


@pytest.mark.parametrize("name", ["tiny", "paper"])
def test_presets_load(name):
    c = load_config(name)
    assert isinstance(c, Config) and c.name == name
    assert set(flat_keys(c)) == set(flat_keys(Config()))
    d = to_dict(c)
    assert d["guidance"]["high_t"] == [0.5, 0.75]


def test_paper_preset_numbers():
    c = load_config("paper")
    assert c.steps == 5000 and c.render.resolution == 512 and c.geometry.grid_resolution == 192
    assert c.theme_prior.steps_single == 200 and c.theme_prior.steps_group == 400
    assert c.concept_prior.steps_before_aug == 150 and c.concept_prior.train.steps == 300
    assert c.reference_prior.train.steps == 150
    assert (c.reference_prior.n_color, c.reference_prior.n_normal) == (30, 30)
    assert c.theme_prior.train.lr == 2e-6 and c.theme_prior.train.model == "weights"


def test_load_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preset named 'nope'"):
        load_config("nope")
    with pytest.raises(FileNotFoundError, match="file not found"):
        load_config(str(tmp_path / "missing.py"))
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    with pytest.raises(ValueError, match="defines no get_config"):
        load_config(str(bad))
    good = tmp_path / "mine.py"
    good.write_text("from tsjax.config import Config\ndef get_config():\n    return Config(name='mine', steps=7)\n")
    assert load_config(str(good)).steps == 7
