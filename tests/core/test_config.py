"""PipelineConfig: section-wise overrides of a copy, refused when they name what does not exist."""

from __future__ import annotations

import pytest

from kaggle_utils.core.config import PipelineConfig


def test_overrides_change_only_the_named_fields_of_a_copy():
    cfg = PipelineConfig()
    cfg.lora.r = 8
    changed = cfg.with_overrides(
        {"train": {"max_steps": 2, "eval_every_steps": 1}, "format": {"max_length": 128}}
    )
    assert (changed.train.max_steps, changed.train.eval_every_steps, changed.format.max_length) == (2, 1, 128)
    assert changed.lora.r == 8  # fields not named keep the source config's values, not the defaults
    assert changed.train.learning_rate == cfg.train.learning_rate
    defaults = PipelineConfig()
    assert (cfg.train.max_steps, cfg.format.max_length) == (
        defaults.train.max_steps,
        defaults.format.max_length,
    )
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


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train": {"ordering": "ft-then-quantize"}}, "train.ordering must be one of"),
        ({"format": {"truncation": "keep_middle"}}, "format.truncation must be one of"),
        ({"inference": {"device": "gpu"}}, "inference.device must be one of"),
        ({"train": {"epochs": 0}}, "train.epochs must be > 0"),
        ({"train": {"learning_rate": "fast"}}, "train.learning_rate must be a number"),
        ({"format": {"max_length": "256"}}, "format.max_length must be an integer"),
        ({"format": {"head_fraction": 1.5}}, "format.head_fraction must be in [0, 1]"),
        ({"model": {"gradient_checkpointing": "yes"}}, "model.gradient_checkpointing must be true or false"),
        ({"lora": {"target_modules": "q_proj"}}, "lora.target_modules must be a list"),
        ({"lora": {"r": 0}}, "lora.r must be >= 1"),
        ({"folds": {"n_folds": 1}}, "folds.n_folds must be >= 2"),
        ({"train": {"max_steps": 0}}, "train.max_steps must be >= 1"),
        ({"train": {"cv_folds": [0, "1"]}}, "train.cv_folds[1] must be an integer"),
        ({"inference": {"safety_margin_hours": 9.5}}, "must be below deadline_hours"),
        ({"baseline": {"swap_augmentation": 1}}, "baseline.swap_augmentation must be true or false"),
        # the held-out fold is the run's (train --fold / qid-study --fold), no longer a config field
        ({"train": {"fold": 1}}, "unknown keys in config section 'train': ['fold']"),
    ],
)
def test_values_are_checked_when_the_config_is_built(raw, message):
    """A wrong value fails at load, naming the YAML's section.field, not deep inside a run."""
    from kaggle_utils.core.errors import ConfigError

    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PipelineConfig.from_dict(raw)


def test_sections_built_in_code_are_checked_too():
    from kaggle_utils.core.config import TrainConfig
    from kaggle_utils.core.errors import ConfigError

    with pytest.raises(ConfigError, match="train.selection must be one of"):
        TrainConfig(selection="best")


def test_lossless_repairs_numbers_from_yaml_text_and_ints_for_floats():
    """PyYAML reads 1e-4 as a string; an int where a float is meant is the same number."""
    cfg = PipelineConfig.from_dict({"train": {"learning_rate": "1e-4", "epochs": 2}, "lora": {"dropout": 0}})
    assert cfg.train.learning_rate == 1e-4 and isinstance(cfg.train.learning_rate, float)
    assert cfg.train.epochs == 2.0 and isinstance(cfg.train.epochs, float)
    assert cfg.lora.dropout == 0.0


def test_the_defaults_and_the_shipped_configs_are_valid():
    from pathlib import Path

    PipelineConfig()
    root = Path(__file__).resolve().parents[2]
    shipped = [*root.glob("kaggle_utils/resources/*.yaml"), *root.glob("reports/*.yaml")]
    assert shipped
    for path in shipped:
        PipelineConfig.from_yaml(path)


def test_dead_fields_are_gone():
    """Run-specific paths are arguments of the commands, not config fields nobody reads."""
    with pytest.raises(ValueError, match="unknown keys"):
        PipelineConfig.from_dict({"train": {"output_dir": "runs/x"}})
    with pytest.raises(ValueError, match="unknown keys"):
        PipelineConfig.from_dict({"folds": {"folds_path": "f.parquet"}})


def test_a_key_given_twice_in_a_yaml_config_is_refused(tmp_path):
    from kaggle_utils.cli.run_options import load_config
    from kaggle_utils.core.errors import UsageError

    path = tmp_path / "dup.yaml"
    path.write_text("train:\n  learning_rate: 1.0e-4\n  learning_rate: 2.0e-4\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"dup.yaml: key 'learning_rate' appears twice \(lines 2 and 3\)"):
        load_config(str(path))
    path.write_text("train: {}\ntrain: {}\n", encoding="utf-8")
    with pytest.raises(UsageError, match=r"key 'train' appears twice \(lines 1 and 2\)"):
        load_config(str(path))


def test_every_recipe_in_configs_loads_and_says_how_to_run_it():
    """configs/: one YAML per model x ordering, each loaded as the CLI loads it, with its launch command and
    expected cost in the header; the demo's recipe is the file the demo runs."""
    from pathlib import Path

    from kaggle_utils.cli.run_options import load_config

    root = Path(__file__).resolve().parents[2]
    recipes = sorted((root / "configs").glob("*.yaml"))
    assert {"gemma2_9b_quant_then_ft.yaml", "gemma2_9b_ft_then_quant.yaml", "demo.yaml"} <= {
        p.name for p in recipes
    }
    for path in recipes:
        cfg = load_config(str(path))
        header = path.read_text(encoding="utf-8").split("\n\n")[0]
        assert "# Run:" in header and "python -m kaggle_utils" in header and "CONFIG_PATH" in header, (
            path.name
        )
        if path.name.startswith("gemma2_9b"):
            assert "Expected time and memory" in header, path.name
            assert cfg.train.ordering == path.stem.removeprefix("gemma2_9b_").replace("_", "-")
    demo = load_config(str(root / "configs" / "demo.yaml"))
    assert demo == load_config(str(root / "kaggle_utils" / "resources" / "compare_demo.yaml"))
