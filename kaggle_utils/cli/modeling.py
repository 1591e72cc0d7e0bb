"""Modeling commands: `train` (one ordering, one fold), `compare-orderings` (every variant on the same folds),
`combine-reports`, `ship` and `lever-table`.

Thin: the package does the work; each handler imports its stage modules (torch) when it runs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from kaggle_utils.cli.run_options import add_run_options, prepare_run
from kaggle_utils.core.console import RUN_LOG
from kaggle_utils.core.errors import UsageError

ORDERING_CHOICES = ("ft-then-quant", "quant-then-ft")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "train", help="train one ordering (LoRA then quantize, or QLoRA) on a fold and write its artifact"
    )
    parser.add_argument("--ordering", required=True, choices=ORDERING_CHOICES)
    _common_options(parser)
    parser.add_argument("--fold", type=int, default=0, help="held-out fold (default: 0)")
    parser.set_defaults(handler=train, run_log=RUN_LOG)

    parser = subparsers.add_parser(
        "compare-orderings",
        help="train both orderings on identical folds/base/seed; write report.json/.md/.png",
    )
    _common_options(parser)
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default: config train.seed)")
    parser.add_argument("--variants", nargs="+", help="registered variants to run (default: both orderings)")
    parser.set_defaults(handler=compare, run_log=RUN_LOG)

    parser = subparsers.add_parser(
        "combine-reports",
        help="join compare-orderings reports made on identical folds and seeds (e.g. the two training "
        "kernels', "
        "or variants run in separate batches) into one report with the common-reference QiD",
    )
    parser.add_argument("reports", nargs="+", help="folders holding report.json and oof.parquet")
    parser.add_argument(
        "--out", required=True, help="folder for the joined report.json/.md/.png and oof.parquet"
    )
    parser.set_defaults(handler=combine)

    parser = subparsers.add_parser(
        "ship",
        help="copy a model artifact with the feature baseline inside it (the fallback on Kaggle), ready for "
        "`kaggle upload-artifact`",
    )
    parser.add_argument("--artifact", required=True, help="a model artifact folder (with manifest.json)")
    parser.add_argument(
        "--baseline", required=True, help="the feature baseline's JSON file (`baseline --save-model FILE`)"
    )
    parser.add_argument("--out", required=True, help="folder to write (replaced if it is a shipped artifact)")
    parser.set_defaults(handler=ship_command)

    parser = subparsers.add_parser(
        "lever-table",
        help="runs trained with different levers (distillation, smoothing, full fine-tuning, GPTQ) on "
        "identical "
        "folds and seed, each against the first: shipped CV log loss, paired difference and its SE",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="LABEL=DIR:VARIANT",
        help="a label, a compare-orderings output folder and the variant in it; the first is the reference",
    )
    parser.add_argument("--out", required=True, help="folder for levers.json and levers.md")
    parser.set_defaults(handler=levers)


def _common_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default="runs/compare", help="output directory (runs, artifacts, report)")
    add_run_options(parser)


def train(args: argparse.Namespace) -> int:
    """One ordering on one fold, directly: the shared setup, then training, export and scoring of that fold
    (`experiment.run_fold`); writes the artifact and the fold's OOF rows under --out."""
    import polars as pl

    from kaggle_utils.core.metrics import save_oof
    from kaggle_utils.evaluate.comparison_report import RunRecord
    from kaggle_utils.evaluate.cv_report import aggregate_run
    from kaggle_utils.studies.experiment import prepare_experiment, run_fold, variant_config
    from kaggle_utils.studies.orderings import OOF_FILE
    from kaggle_utils.train.model_setup import finish_distributed
    from kaggle_utils.variants.registry import resolve_variants

    cfg, out_dir, train_path = prepare_run(args)
    fold = args.fold
    experiment = prepare_experiment(cfg, train_path, out_dir, args.folds, fold_ids=[fold])
    variant = resolve_variants([args.ordering])[0]
    run_cfg = variant_config(cfg, variant, cfg.train.seed, experiment.base_dir)
    record, tables = run_fold(
        experiment,
        run_cfg,
        variant,
        fold,
        cfg.train.seed,
        out_dir / "runs" / f"seed{cfg.train.seed}" / variant.name / f"fold{fold}",
    )
    finish_distributed()
    if record is None:  # a non-main process of `accelerate launch`: the main one writes and reports
        return 0
    save_oof(
        pl.concat(tables, how="vertical"), out_dir / OOF_FILE, replace="name", record=experiment.oof_record
    )
    run = RunRecord.from_dict(aggregate_run(variant, cfg.train.seed, [record], experiment.dialect))
    print(
        f"{args.ordering}, fold {fold}: held-out log loss 16-bit {run.cv_log_loss_16bit:.4f}, "
        f"quantized {run.cv_log_loss_quantized:.4f} (class prior {run.prior_log_loss:.4f})"
    )
    print(f"artifact: {run.folds[0].artifact_dir}")
    return 0


def compare(args: argparse.Namespace) -> int:
    from kaggle_utils.studies.orderings import REPORT_MD, compare_orderings
    from kaggle_utils.train.model_setup import finish_distributed

    cfg, out_dir, train_path = prepare_run(args)
    report = compare_orderings(
        cfg,
        train_path,
        out_dir,
        folds_path=args.folds,
        seeds=args.seeds or [cfg.train.seed],
        variants=args.variants,
    )
    # Under `accelerate launch`: all ranks leave the process group together once the main one has written. (On
    # an
    # error the rank exits at once and torchrun stops the others, rather than waiting here for a barrier.)
    finish_distributed()
    if report is None:  # a non-main process of `accelerate launch`
        return 0
    print(report.statement)
    if report.ship:
        print(report.ship["statement"])
        print(f"ships: {report.shipped_artifact}")
    print(f"report: {Path(args.out) / REPORT_MD}")
    return 0


def levers(args: argparse.Namespace) -> int:
    from kaggle_utils.studies.lever_table import lever_table, render_lever_table

    entries = []
    for spec in args.runs:
        label, sep, rest = spec.partition("=")
        directory, colon, variant = rest.rpartition(":")
        if not (sep and colon and label and directory and variant):
            raise UsageError(f"lever-table: {spec!r} is not LABEL=DIR:VARIANT")
        entries.append((label, directory, variant))
    table = lever_table(entries, args.out)
    print(render_lever_table(table), end="")
    print(f"table: {Path(args.out) / 'levers.md'}")
    return 0


def ship_command(args: argparse.Namespace) -> int:
    from kaggle_utils.evaluate.ship import ship_artifact

    out = ship_artifact(args.artifact, args.out, args.baseline)
    print(
        f"shipped {args.artifact} with fallback baseline {args.baseline} -> {out}; upload it with "
        f"`python -m kaggle_utils kaggle upload-artifact {out}`"
    )
    return 0


def combine(args: argparse.Namespace) -> int:
    from kaggle_utils.studies.combine import combine_reports

    report = combine_reports(args.reports, args.out)
    print(report.statement)
    print(f"report: {Path(args.out) / 'report.md'}")
    return 0
