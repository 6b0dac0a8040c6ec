"""Host-side parts of prior training: prompt dropout draws and the tiny preset's prompt settings."""
import numpy as np
import pytest

from tsjax.config import GuidanceConfig, PriorTrainConfig, load_config
from tsjax.theme.priors import prompt_rows


def test_prompt_rows_drop_to_the_empty_row_at_the_stated_rate():
    rows = np.arange(4000) % 3
    out = prompt_rows(rows, np.random.default_rng(0), 0.1, empty=7)
    dropped = out == 7
    assert 0.09 < dropped.mean() < 0.11  # binomial(4000, 0.1): sd 0.005
    np.testing.assert_array_equal(out[~dropped], rows[~dropped])  # the others keep their own prompt
    # deterministic from the generator state
    np.testing.assert_array_equal(out, prompt_rows(rows, np.random.default_rng(0), 0.1, empty=7))


def test_prompt_rows_without_dropout_leave_rows_and_rng_alone():
    rng = np.random.default_rng(3)
    rows = np.array([2, 0, 1])
    assert prompt_rows(rows, rng, 0.0, empty=-1) is rows
    assert rng.random() == np.random.default_rng(3).random()  # no draw was consumed


def test_tiny_priors_learn_the_unconditional_prompt_and_use_their_training_prompts():
    cfg = load_config("tiny")
    for t in (cfg.theme_prior.train, cfg.concept_prior.train, cfg.reference_prior.train):
        assert t.model == "tiny" and t.prompt_dropout == 0.1
    assert cfg.guidance.view_prompts is False
    paper = load_config("paper")  # SD DreamBooth fine-tunes as the official code: no dropout, view suffixes
    assert paper.theme_prior.train.prompt_dropout == 0.0 and paper.guidance.view_prompts is True
    with pytest.raises(ValueError, match="prompt_dropout"):
        PriorTrainConfig(prompt_dropout=1.0)
    assert GuidanceConfig().view_prompts is True


def test_view_prompt_rows_with_and_without_suffixes():
    from tsjax.theme.prompts import DIRECTIONS, view_prompts

    assert view_prompts("a house") == [f"a house, {d} view" for d in DIRECTIONS]
    assert view_prompts("a house", suffixes=False) == ["a house"] * len(DIRECTIONS)
