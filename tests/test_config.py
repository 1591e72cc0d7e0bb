"""PipelineConfig: section-wise overrides of a copy, refused when they name what does not exist."""

from __future__ import annotations

import pytest

from kaggle_utils.config import PipelineConfig


def test_overrides_change_only_the_named_fields_of_a_copy():
    cfg = PipelineConfig()
    cfg.lora.r = 8
    changed = cfg.with_overrides({"train": {"max_steps": 2, "eval_every_steps": 1}, "format": {"max_length": 128}})
    assert (changed.train.max_steps, changed.train.eval_every_steps, changed.format.max_length) == (2, 1, 128)
    assert changed.lora.r == 8  # fields not named keep the source config's values, not the defaults
    assert changed.train.learning_rate == cfg.train.learning_rate
    defaults = PipelineConfig()
    assert (cfg.train.max_steps, cfg.format.max_length) == (defaults.train.max_steps, defaults.format.max_length)
    assert changed.train is not cfg.train


def test_overrides_coerce_lists_to_tuples_as_yaml_does():
    changed = PipelineConfig().with_overrides({"train": {"cv_folds": [0, 2]}})
    assert changed.train.cv_folds == (0, 2)
    assert PipelineConfig().with_overrides(None) == PipelineConfig()
    assert PipelineConfig().with_overrides({}) == PipelineConfig()


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"trian": {"max_steps": 2}}, r"unknown config sections: \['trian'\]"),
        ({"train": {"max_stepz": 2}}, r"unknown keys in config section 'train': \['max_stepz'\]"),
        ({"train": 2}, "section 'train' must be a mapping"),
    ],
)
def test_unknown_sections_keys_and_non_mappings_are_refused(overrides, message):
    with pytest.raises(ValueError, match=message):
        PipelineConfig().with_overrides(overrides)
