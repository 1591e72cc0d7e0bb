"""The options the training commands (`train`, `compare-orderings`, `qid-study`) share (config, training
data, folds, torch threads, --set) and how they become a config, an output folder and a training file.
Not a command group: the groups import it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.data.dialects import get_dialect

# Fewer generated rows leave a held-out fold too small to score.
MIN_SAMPLE_ROWS = 50


def add_run_options(parser: argparse.ArgumentParser, *, data_required: bool = False) -> None:
    """--config, --train | --sample-rows (one of them required when `data_required`), --folds, --threads."""
    parser.add_argument(
        "--config",
        help="pipeline YAML (default: the built-in defaults; kaggle_utils/resources/compare_demo.yaml is "
        "demo scale)",
    )
    source = parser.add_mutually_exclusive_group(required=data_required)
    default = "" if data_required else " (default: config data.train_path)"
    source.add_argument("--train", help=f"competition training file, CSV or parquet{default}")
    source.add_argument("--sample-rows", type=int, help="generate this many competition-format rows instead")
    parser.add_argument("--folds", help="folds parquet (default: made from the config's fold settings)")
    parser.add_argument(
        "--threads", type=int, help="torch CPU threads (default: torch's; 1 is fastest for tiny models)"
    )
    add_set_option(parser)


def add_set_option(parser: argparse.ArgumentParser) -> None:
    """--set section.field=value (repeatable): change one config value for this run, on top of --config."""
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SECTION.FIELD=VALUE",
        dest="set_values",
        help="override one config value, e.g. --set train.learning_rate=2e-4 --set lora.r=16 (YAML syntax "
        "for the value; repeatable; applied after --config)",
    )


def parse_set_values(items: list[str]) -> dict[str, dict[str, object]]:
    """`["train.lr=1e-4", ...]` -> {"train": {"lr": 0.0001}}; each value is read as YAML."""
    import yaml

    overrides: dict[str, dict[str, object]] = {}
    for item in items:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name:
            raise UsageError(f"--set {item!r}: expected SECTION.FIELD=VALUE, e.g. train.learning_rate=2e-4")
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as error:
            raise UsageError(
                f"--set {item!r}: the value is not valid YAML ({' '.join(str(error).split())})"
            ) from error
        overrides.setdefault(section, {})[name] = value
    return overrides


def config_from_args(args: argparse.Namespace) -> PipelineConfig:
    """--config (the defaults without one) with every --set applied; a bad value is a one-line UsageError."""
    cfg = load_config(getattr(args, "config", None))
    items = getattr(args, "set_values", None) or []
    if not items:
        return cfg
    try:
        return cfg.with_overrides(parse_set_values(items))
    except (ValueError, TypeError) as error:
        raise UsageError(f"--set: {error}") from error


def load_config(path: str | None) -> PipelineConfig:
    """The YAML config at `path` (the defaults when None); a missing or invalid file is a UsageError."""
    if path is None:
        return PipelineConfig()
    import yaml

    if not Path(path).is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        return PipelineConfig.from_yaml(path)
    except yaml.YAMLError as error:
        raise UsageError(f"{path}: not valid YAML ({' '.join(str(error).split())})") from error
    except (OSError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: cannot read the config ({error})") from error
    except (
        ValueError,
        TypeError,
        AttributeError,
    ) as error:  # unknown keys, wrong shapes (a list, not a mapping)
        raise UsageError(f"{path}: {error}") from error


def prepare_run(args: argparse.Namespace) -> tuple[PipelineConfig, Path, str]:
    """(cfg, out_dir, train_path) from the parsed options: sets torch's threads, creates `args.out`, and
    generates --sample-rows rows under <out>/data when asked (else --train, else data.train_path)."""
    cfg = config_from_args(args)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if args.sample_rows is not None:
        if args.sample_rows < MIN_SAMPLE_ROWS:
            raise UsageError(
                f"--sample-rows {args.sample_rows} is too few for a held-out fold; use >= {MIN_SAMPLE_ROWS}"
            )
        # generated files in the config's dialect (data.format), so the loader reads what was written
        files = get_dialect(cfg.data.format).generate_sample(
            out_dir / "data", n_train=args.sample_rows, n_test=10, seed=0
        )
        return cfg, out_dir, str(files.train_path)
    path = args.train or cfg.data.train_path
    if not path:
        raise UsageError("no training data: pass --train PATH or --sample-rows N (or set data.train_path)")
    return cfg, out_dir, path
