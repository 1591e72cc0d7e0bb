"""Modeling commands: `train` (one ordering) and `compare-orderings` (both, same folds). Thin: compare.py works."""

from __future__ import annotations

import argparse
from pathlib import Path

from kaggle_utils.errors import UsageError

ORDERING_CHOICES = ("ft-then-quant", "quant-then-ft")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train one ordering (LoRA then quantize, or QLoRA) on a fold and write its artifact"
    )
    parser.add_argument("--ordering", required=True, choices=ORDERING_CHOICES)
    _common_options(parser)
    parser.add_argument("--fold", type=int, help="held-out fold (default: config train.fold)")
    parser.set_defaults(handler=train)

    parser = subparsers.add_parser(
        "compare-orderings",
        help="train both orderings on identical folds/base/seed; write report.json/.md/.png",
    )
    _common_options(parser)
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: config train.seed)")
    parser.add_argument("--variants", nargs="+", help="registered variants to run (default: both orderings)")
    parser.set_defaults(handler=compare)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML; kaggle_utils/resources/compare_demo.yaml is demo scale")
    parser.add_argument("--out", default="runs/compare", help="output directory (runs, artifacts, report)")
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--train", help="competition training file (default: config data.train_path)")
    source.add_argument("--sample-rows", type=int, help="generate this many competition-format rows instead")
    parser.add_argument("--folds", help="folds parquet (default: made from the config's fold settings)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for the tiny model)")


def _config(path: str | None):
    from kaggle_utils.config import PipelineConfig

    if path is None:
        return PipelineConfig()
    if not Path(path).is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        return PipelineConfig.from_yaml(path)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{path}: {error}") from error


def _train_path(args: argparse.Namespace, cfg, out_dir: Path) -> str:
    if args.sample_rows is not None:
        from kaggle_utils.sample import generate_competition_files

        if args.sample_rows < 50:
            raise UsageError(f"--sample-rows {args.sample_rows} is too few for a held-out fold; use >= 50")
        return str(generate_competition_files(out_dir / "data", n_train=args.sample_rows, n_test=10, seed=0).train_csv)
    path = args.train or cfg.data.train_path
    if not path:
        raise UsageError("no training data: pass --train PATH or --sample-rows N (or set data.train_path)")
    return path


def _run(args: argparse.Namespace, variants: list[str] | None, seeds: list[int] | None, cfg) -> dict:
    import torch

    from kaggle_utils.compare import compare_orderings

    if args.threads:
        torch.set_num_threads(args.threads)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    return compare_orderings(cfg, _train_path(args, cfg, out_dir), out_dir, folds_path=args.folds,
                             seeds=seeds or [cfg.train.seed], variants=variants)


def train(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    fold = cfg.train.fold if args.fold is None else args.fold
    cfg.train.cv_folds = (fold,)
    report = _run(args, [args.ordering], None, cfg)
    run = report["runs"][0]
    per_fold = run["per_fold"][0]
    print(f"{args.ordering}, fold {fold}: held-out log loss 16-bit {per_fold['log_loss_16bit']:.4f}, "
          f"quantized {per_fold['log_loss_quantized']:.4f} (class prior {run['prior_log_loss']:.4f})")
    print(f"artifact: {per_fold['artifact_dir']}")
    return 0


def compare(args: argparse.Namespace) -> int:
    cfg = _config(args.config)
    report = _run(args, args.variants, args.seeds, cfg)
    print(report["decision"]["statement"])
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
