"""Modeling commands: `train` (one ordering) and `compare-orderings` (both, same folds). Thin: compare.py works."""

from __future__ import annotations

import argparse
from pathlib import Path

from kaggle_utils.commands.run_options import add_run_options, prepare_run
from kaggle_utils.compare import compare_orderings
from kaggle_utils.kaggle_tools.reports import combine_reports
from kaggle_utils.training import finish_distributed

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

    parser = subparsers.add_parser(
        "combine-reports",
        help="join compare-orderings reports made on identical folds and seeds (e.g. the two training kernels', "
             "or variants run in separate batches) into one report with the common-reference QiD",
    )
    parser.add_argument("reports", nargs="+", help="folders holding report.json and oof.parquet")
    parser.add_argument("--out", required=True, help="folder for the joined report.json/.md/.png and oof.parquet")
    parser.set_defaults(handler=combine)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/compare", help="output directory (runs, artifacts, report)")
    add_run_options(parser)


def _run(args: argparse.Namespace, variants: list[str] | None, seeds: list[int] | None, cfg, out_dir: Path,
         train_path: str) -> dict:
    report = compare_orderings(cfg, train_path, out_dir, folds_path=args.folds, seeds=seeds or [cfg.train.seed],
                               variants=variants)
    # Under `accelerate launch`: all ranks leave the process group together once the main one has written. (On an
    # error the rank exits at once and torchrun stops the others, rather than waiting here for a barrier.)
    finish_distributed()
    return report


def train(args: argparse.Namespace) -> int:
    cfg, out_dir, train_path = prepare_run(args)
    fold = cfg.train.fold if args.fold is None else args.fold
    cfg.train.cv_folds = (fold,)
    report = _run(args, [args.ordering], None, cfg, out_dir, train_path)
    if not report:  # a non-main process of `accelerate launch`: the main one writes and reports
        return 0
    run = report["runs"][0]
    per_fold = run["per_fold"][0]
    print(f"{args.ordering}, fold {fold}: held-out log loss 16-bit {per_fold['log_loss_16bit']:.4f}, "
          f"quantized {per_fold['log_loss_quantized']:.4f} (class prior {run['prior_log_loss']:.4f})")
    print(f"artifact: {per_fold['artifact_dir']}")
    return 0


def compare(args: argparse.Namespace) -> int:
    cfg, out_dir, train_path = prepare_run(args)
    report = _run(args, args.variants, args.seeds, cfg, out_dir, train_path)
    if not report:  # a non-main process of `accelerate launch`
        return 0
    print(report["decision"]["statement"])
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def combine(args: argparse.Namespace) -> int:
    report = combine_reports(args.reports, args.out)
    print(report["decision"]["statement"])
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
