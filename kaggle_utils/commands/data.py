"""Data commands: validate-data, folds, validate-submission, baseline, demo. Thin: the package does the work."""

from __future__ import annotations

import argparse
from pathlib import Path

from kaggle_utils import demo_figures
from kaggle_utils.baseline import run_baseline_cv
from kaggle_utils.config import BaselineConfig, DataConfig, FoldConfig
from kaggle_utils.data import load_competition
from kaggle_utils.demo import BASELINE_STEPS, DEMO_STEPS, run_demo
from kaggle_utils.errors import UsageError
from kaggle_utils.fileio import check_not_an_input, check_output_target
from kaggle_utils.folds import fold_summary, load_folds, make_folds, save_folds
from kaggle_utils.metrics import save_oof
from kaggle_utils.submission import validate_submission as validate
from kaggle_utils.submission import write_submission


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate-data", help="load a competition file and print its data report (exit 2 if unusable)"
    )
    parser.add_argument("path", help="train/test CSV (LMSYS) or parquet (WSDM)")
    parser.add_argument("--format", choices=("lmsys", "wsdm"), default="lmsys")
    parser.add_argument("--split", choices=("train", "test", "auto"), default="auto")
    parser.set_defaults(handler=validate_data)

    parser = subparsers.add_parser("folds", help="stratified K-fold grouped by normalised prompt -> parquet")
    parser.add_argument("--train", required=True, help="training CSV/parquet")
    parser.add_argument("--out", required=True, help="folds parquet to write (id, fold, group)")
    parser.add_argument("--n-folds", type=int, default=FoldConfig.n_folds)
    parser.add_argument("--seed", type=int, default=FoldConfig.seed)
    parser.add_argument("--format", choices=("lmsys", "wsdm"), default="lmsys")
    parser.set_defaults(handler=folds)

    parser = subparsers.add_parser("validate-submission", help="check a submission CSV against the test file")
    parser.add_argument("path", help="submission CSV")
    parser.add_argument("--test", required=True, help="the competition test file whose ids must be covered")
    parser.set_defaults(handler=validate_submission)

    parser = subparsers.add_parser(
        "baseline", help="feature baseline with grouped CV (optionally a submission)"
    )
    parser.add_argument("--train", required=True, help="training CSV/parquet")
    parser.add_argument("--folds", help="folds parquet (default: make them with --n-folds/--seed)")
    parser.add_argument("--n-folds", type=int, default=FoldConfig.n_folds)
    parser.add_argument("--seed", type=int, default=FoldConfig.seed)
    parser.add_argument("--model", choices=("hgb", "logreg"), default=BaselineConfig.model)
    parser.add_argument("--format", choices=("lmsys", "wsdm"), default="lmsys")
    parser.add_argument("--test", help="test file to predict (needs --out)")
    parser.add_argument("--out", help="submission CSV to write for --test")
    parser.add_argument("--oof", help="write the OOF predictions to this parquet")
    parser.add_argument("--save-model", help="write the fitted model here (JSON parameters + <name>.manifest.json)")
    parser.set_defaults(handler=baseline)

    parser = subparsers.add_parser(
        "demo",
        help="generated data -> folds -> baseline CV -> both Gemma-2 orderings -> LLM inference -> validated submission",
    )
    parser.add_argument("--out", required=True, help="directory for data, folds, OOF, model and demo_report")
    parser.add_argument("--submission", default="submissions/submission.csv")
    parser.add_argument("--n-train", type=int, default=2000)
    parser.add_argument("--n-test", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--baseline-only", action="store_true", help="stop after the baseline submission (seconds, no LLM steps)"
    )
    parser.add_argument(
        "--record", action="store_true",
        help="write this run's headline figures to reports/demo/headline.json and re-render the README's demo "
             "figures from them (run from the repository root, with the default sizes)",
    )
    parser.set_defaults(handler=demo)


def validate_data(args: argparse.Namespace) -> int:
    loaded = load_competition(args.path, DataConfig(format=args.format), split=args.split)
    print(loaded.report.to_text())
    return 0


def folds(args: argparse.Namespace) -> int:
    train = load_competition(args.train, DataConfig(format=args.format), split="train")
    fold_table = make_folds(train.frame, FoldConfig(n_folds=args.n_folds, seed=args.seed))
    digest = save_folds(fold_table, args.out)
    print(fold_summary(fold_table, train.frame))
    print(
        f"{fold_table.height} rows, {fold_table['group'].n_unique()} prompt groups -> {args.out} (sha256 {digest})"
    )
    return 0


def validate_submission(args: argparse.Namespace) -> int:
    report = validate(args.path, args.test)
    print(f"ok: {report.summary()}")
    return 0


def baseline(args: argparse.Namespace) -> int:
    if bool(args.test) != bool(args.out):
        raise UsageError(
            "baseline: --test and --out go together (the test file to predict, the CSV to write)"
        )
    _check_outputs(
        [args.out, args.oof, args.save_model, args.save_model and f"{args.save_model}.manifest.json"],
        [("training file", args.train), ("test file", args.test), ("folds file", args.folds)],
    )
    data_cfg = DataConfig(format=args.format)
    train = load_competition(args.train, data_cfg, split="train")
    fold_table = (
        load_folds(args.folds)
        if args.folds
        else make_folds(train.frame, FoldConfig(n_folds=args.n_folds, seed=args.seed))
    )
    result = run_baseline_cv(train.frame, fold_table, BaselineConfig(model=args.model))
    score = result.score
    for fold, value in score.per_fold.items():
        print(f"fold {fold}: log loss {value:.4f}")
    print(
        f"OOF log loss {score.log_loss:.4f} ({score.rows} rows); class prior {score.prior_log_loss:.4f}, "
        f"uniform {score.uniform_log_loss:.4f}"
    )
    if args.oof:
        save_oof(result.oof, args.oof)
        print(f"OOF -> {args.oof}")
    if args.save_model:
        print(f"model -> {result.model.save(args.save_model)}")
    if args.test:
        test = load_competition(args.test, data_cfg, split="test")
        report = write_submission(
            test.frame["id"],
            result.model.predict_proba(test.frame),
            args.out,
            expected_ids=test.frame["id"],
            fallback_prior=result.model.class_prior,
        )
        validate(args.out, args.test)
        print(f"submission: {report.summary()} (validated)")
    return 0


def _check_outputs(outputs: list[str | None], inputs: list[tuple[str, str | None]]) -> None:
    """Before any work: no output may be an input (it would be destroyed) or a symlink / device / folder, and
    no two outputs may be the same file."""
    given = [output for output in outputs if output]
    for index, output in enumerate(given):
        check_output_target(output)
        check_not_an_input(output, [*inputs, *((f"output {other}", other) for other in given[:index])])


def demo(args: argparse.Namespace) -> int:
    if args.record and (args.baseline_only or (args.n_train, args.n_test, args.seed) != (2000, 200, 0)):
        raise UsageError("--record keeps the README's `make demo` figures: use it with the default sizes and seed, "
                         "without --baseline-only")
    report = run_demo(
        Path(args.out),
        submission_path=args.submission,
        n_train=args.n_train,
        n_test=args.n_test,
        seed=args.seed,
        steps=BASELINE_STEPS if args.baseline_only else DEMO_STEPS,
    )
    if args.record:
        demo_figures.record(report)
        print(f"figures -> {demo_figures.HEADLINE_PATH} and {demo_figures.README_PATH}")
    return 0
