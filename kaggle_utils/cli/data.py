"""Data commands: validate-data, folds, validate-submission, baseline, pseudo-label, demo.

Thin: the package does the work. Registration imports only torch-free modules; `baseline`, `pseudo-label`
and `demo` import their stage modules when they run, so `--help` and the light commands stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path

from kaggle_utils.cli.run_options import add_set_option, config_from_args
from kaggle_utils.core.config import LABEL_COLUMNS, DataConfig, FoldConfig, PipelineConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.fileio import check_not_an_input, check_output_apart, check_output_target
from kaggle_utils.core.metrics import exclusion_record, oof_probs, save_oof
from kaggle_utils.data.dialects import get_dialect
from kaggle_utils.data.load import load_competition

DEMO_N_TRAIN, DEMO_N_TEST = 2000, 200


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "validate-data", help="load a competition file and print its data report (exit 2 if unusable)"
    )
    parser.add_argument("path", help="train/test CSV (LMSYS) or parquet (WSDM)")
    _add_dialect(parser)
    parser.add_argument("--split", choices=("train", "test", "auto"), default="auto")
    parser.set_defaults(handler=validate_data)

    parser = subparsers.add_parser("folds", help="stratified K-fold grouped by normalised prompt -> parquet")
    parser.add_argument("--train", required=True, help="training CSV/parquet")
    parser.add_argument("--out", required=True, help="folds parquet to write (id, fold, group)")
    _add_fold_options(parser)
    _add_dialect(parser, default=None)
    _add_config_options(parser)
    parser.set_defaults(handler=folds)

    parser = subparsers.add_parser("validate-submission", help="check a submission CSV against the test file")
    parser.add_argument("path", help="submission CSV")
    parser.add_argument("--test", required=True, help="the competition test file whose ids must be covered")
    _add_dialect(parser)
    parser.set_defaults(handler=validate_submission)

    parser = subparsers.add_parser(
        "baseline", help="feature baseline with grouped CV (optionally a submission)"
    )
    parser.add_argument("--train", required=True, help="training CSV/parquet")
    parser.add_argument("--folds", help="folds parquet (default: make them with --n-folds/--seed)")
    _add_fold_options(parser)
    parser.add_argument(
        "--model", choices=("hgb", "logreg"), help="baseline model (default: config baseline.model)"
    )
    parser.add_argument(
        "--exclude-folds",
        type=int,
        nargs="+",
        metavar="FOLD",
        help="leave these folds' rows out altogether (a nested-fold teacher for students held out "
        "on them: its OOF comes from models that never saw those rows)",
    )
    _add_dialect(parser, default=None)
    _add_config_options(parser)
    parser.add_argument("--test", help="test file to predict (needs --out)")
    parser.add_argument("--out", help="submission CSV to write for --test")
    parser.add_argument(
        "--oof",
        help="write the OOF predictions to this parquet (its metadata records the "
        "excluded folds, so a student held out on one of them accepts it as a teacher)",
    )
    parser.add_argument(
        "--save-model", help="write the fitted model here (JSON parameters + <name>.manifest.json)"
    )
    parser.set_defaults(handler=baseline)

    parser = subparsers.add_parser(
        "pseudo-label",
        help="label unlabelled conversations with a teacher, keep the confident ones, drop training prompts",
    )
    parser.add_argument(
        "--teacher",
        required=True,
        action="append",
        metavar="[FOLD=]FILE",
        help="the teacher's predictions for the unlabelled rows: predict's submission.csv or an "
        "OOF-format parquet (id, p_a, p_b, p_tie[, name]). FOLD=FILE: FILE's model never "
        "trained on fold FOLD, and labels the rows fold FOLD's student trains on (repeat it, "
        "one teacher per fold; needs --folds). A FILE whose metadata records its excluded "
        "folds stands for those folds. A lone FILE with neither stands for any fold, "
        "unverified: training then refuses it unless train.teacher_allow_leak=true",
    )
    parser.add_argument("--folds", help="the folds file the students' folds come from (FOLD=FILE teachers)")
    parser.add_argument("--teacher-name", help="which `name` of a parquet teacher holding several models")
    parser.add_argument(
        "--unlabelled",
        required=True,
        help="the test file or external conversations, in the competition's format",
    )
    parser.add_argument(
        "--train",
        required=True,
        help="the training file: rows whose normalised prompt is in it are dropped (counted)",
    )
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--threshold", type=float, help="keep rows whose top probability is at least this")
    rule.add_argument(
        "--top-fraction", type=float, help="keep this fraction of the rows, most confident first"
    )
    parser.add_argument(
        "--out", required=True, help="pseudo-label parquet to write (train with --set train.pseudo_path=OUT)"
    )
    _add_dialect(parser, default=None)
    _add_config_options(parser)
    parser.set_defaults(handler=pseudo_label)

    parser = subparsers.add_parser(
        "demo",
        help="generated data -> folds -> baseline CV -> both Gemma-2 orderings -> LLM inference -> validated "
        "submission",
    )
    parser.add_argument("--out", required=True, help="directory for data, folds, OOF, model and demo_report")
    parser.add_argument("--submission", default="submissions/submission.csv")
    parser.add_argument("--n-train", type=int, help="generated training rows (default 2000; --real: 80)")
    parser.add_argument("--n-test", type=int, help="generated test rows (default 200; --real: 16)")
    parser.add_argument("--seed", type=int, default=0)
    _add_dialect(
        parser,
        "generate and run on this competition's format (wsdm: parquet, winner A/B, accuracy, "
        "submission id,winner)",
    )
    parser.add_argument(
        "--baseline-only",
        action="store_true",
        help="stop after the baseline submission (seconds, no LLM steps)",
    )
    parser.add_argument(
        "--real",
        action="store_true",
        help="train both orderings on a real checkpoint (Gemma 3 270M from fetch-model) with its own "
        "tokenizer",
    )
    parser.add_argument(
        "--model-dir",
        default="models/gemma-3-270m",
        help="--real: the checkpoint directory (fetch-model gemma-3-270m --out DIR writes it)",
    )
    parser.add_argument("--max-steps", type=int, help="--real: optimizer steps per ordering (default 8)")
    parser.add_argument("--max-length", type=int, help="--real: tokens per formatted pair (default 256)")
    parser.add_argument(
        "--record",
        action="store_true",
        help="write this run's headline figures to reports/demo/headline.json and re-render the README's "
        "demo figures from them (run from the repository root, with the default sizes)",
    )
    parser.set_defaults(handler=demo)


def _add_fold_options(parser: argparse.ArgumentParser) -> None:
    defaults = FoldConfig()
    parser.add_argument(
        "--n-folds", type=int, help=f"folds (default: config folds.n_folds, {defaults.n_folds})"
    )
    parser.add_argument("--seed", type=int, help=f"fold seed (default: config folds.seed, {defaults.seed})")


def _add_config_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="pipeline YAML: its data/folds/baseline sections set the defaults")
    add_set_option(parser)


def _command_config(args: argparse.Namespace) -> PipelineConfig:
    """--config and --set, then this command's own flags on top (a flag given wins over the config)."""
    cfg = config_from_args(args)
    if getattr(args, "format", None) is not None:
        cfg.data = dataclasses.replace(cfg.data, format=get_dialect(args.format).name)
    folds = {
        k: v
        for k, v in (("n_folds", getattr(args, "n_folds", None)), ("seed", getattr(args, "seed", None)))
        if v is not None
    }
    if folds:
        cfg.folds = dataclasses.replace(cfg.folds, **folds)
    if getattr(args, "model", None) is not None:
        cfg.baseline = dataclasses.replace(cfg.baseline, model=args.model)
    return cfg


def _add_dialect(
    parser: argparse.ArgumentParser, help_text: str | None = None, default: str | None = "lmsys"
) -> None:
    """`--dialect` (alias `--format`): a registered competition dialect, checked when the command runs (an
    unknown name is a one-line usage error). Commands with --config default to its data.format (None)."""
    parser.add_argument(
        "--dialect",
        "--format",
        dest="format",
        default=default,
        metavar="NAME",
        help=help_text
        or "competition dialect: lmsys (CSV, A/B/tie, log loss) or wsdm (parquet, winner A/B, accuracy)",
    )


def validate_data(args: argparse.Namespace) -> int:
    loaded = load_competition(args.path, DataConfig(format=args.format), split=args.split)
    print(loaded.report.to_text())
    return 0


def folds(args: argparse.Namespace) -> int:
    from kaggle_utils.data.folds import fold_summary, make_folds, save_folds

    cfg = _command_config(args)
    train = load_competition(args.train, cfg.data, split="train")
    fold_table = make_folds(train.frame, cfg.folds)
    digest = save_folds(fold_table, args.out)
    print(fold_summary(fold_table, train.frame))
    print(
        f"{fold_table.height} rows, {fold_table['group'].n_unique()} prompt groups -> {args.out} (sha256 "
        f"{digest})"
    )
    return 0


def validate_submission(args: argparse.Namespace) -> int:
    report = get_dialect(args.format).validate(args.path, args.test)
    print(f"ok: {report.summary()}")
    return 0


def baseline(args: argparse.Namespace) -> int:
    from kaggle_utils.data.folds import drop_folds, folds_file_hash, load_folds, make_folds
    from kaggle_utils.train.baseline import run_baseline_cv

    if bool(args.test) != bool(args.out):
        raise UsageError(
            "baseline: --test and --out go together (the test file to predict, the CSV to write)"
        )
    _check_outputs(
        [args.out, args.oof, args.save_model, args.save_model and f"{args.save_model}.manifest.json"],
        [("training file", args.train), ("test file", args.test), ("folds file", args.folds)],
    )
    cfg = _command_config(args)
    dialect = get_dialect(cfg.data.format)
    data_cfg = cfg.data
    train = load_competition(args.train, data_cfg, split="train")
    fold_table = load_folds(args.folds) if args.folds else make_folds(train.frame, cfg.folds)
    record = exclusion_record(
        fold_table, args.exclude_folds, folds_file_hash(args.folds) if args.folds else None
    )
    frame, fold_table = drop_folds(
        train.frame, fold_table, args.exclude_folds, f"{args.folds or 'the folds'} (--exclude-folds)"
    )
    if args.exclude_folds:
        print(
            f"--exclude-folds {sorted(args.exclude_folds)}: {train.frame.height - frame.height} rows left out"
        )
    result = run_baseline_cv(frame, fold_table, cfg.baseline)
    score = result.score
    for fold, value in score.per_fold.items():
        print(f"fold {fold}: log loss {value:.4f}")
    print(
        f"OOF log loss {score.log_loss:.4f} ({score.rows} rows); class prior {score.prior_log_loss:.4f}, "
        f"uniform {score.uniform_log_loss:.4f}"
    )
    if dialect.metric.name != "log_loss":
        metrics = dialect.scores(result.oof["label"].to_numpy(), oof_probs(result.oof))
        print(
            f"OOF {dialect.name} metric: "
            + ", ".join(f"{name} {value:.4f}" for name, value in metrics.items())
        )
    if args.oof:
        save_oof(result.oof, args.oof, record=record)
        left_out = sorted(args.exclude_folds) if args.exclude_folds else "none"
        print(f"OOF -> {args.oof} (excluded folds recorded: {left_out})")
    if args.save_model:
        print(f"model -> {result.model.save(args.save_model)}")
    if args.test:
        test = load_competition(args.test, data_cfg, split="test")
        report = dialect.write(
            test.frame["id"],
            result.model.predict_proba(test.frame),
            args.out,
            expected_ids=test.frame["id"],
            fallback_prior=result.model.class_prior,
        )
        dialect.validate(args.out, args.test)
        print(f"submission: {report.summary()} (validated)")
    return 0


def pseudo_label(args: argparse.Namespace) -> int:
    from kaggle_utils.train.pseudo_labels import (
        parse_teacher_option,
        pseudo_labels_from_files,
        save_pseudo_labels,
    )

    teachers = [parse_teacher_option(value) for value in args.teacher]
    _check_outputs(
        [args.out],
        [
            *(("teacher file", path) for _, path in teachers),
            ("unlabelled file", args.unlabelled),
            ("training file", args.train),
            ("folds file", args.folds),
        ],
    )
    cfg = _command_config(args)
    pseudo, report = pseudo_labels_from_files(
        teachers,
        args.unlabelled,
        args.train,
        data_cfg=cfg.data,
        threshold=args.threshold,
        top_fraction=args.top_fraction,
        teacher_name=args.teacher_name,
        folds_path=args.folds,
    )
    for teacher in report.teachers:
        if teacher["folds"] is None:
            stands = "any fold, unverified (training refuses it unless train.teacher_allow_leak=true)"
        else:
            stands = f"folds {sorted(int(f) for f in teacher['folds'])} ({teacher['source']})"
        print(f"teacher {teacher['path']}: {teacher['kept']} rows, for {stands}")
    rule = (
        f"top probability >= {args.threshold}"
        if args.threshold is not None
        else f"the most confident {args.top_fraction:.0%}"
    )
    lowest = (
        ""
        if report.min_confidence_kept is None
        else f", lowest kept confidence {report.min_confidence_kept:.3f}"
    )
    print(f"{report.offered} rows offered; {report.kept_by_confidence} kept by the rule ({rule}{lowest})")
    print(
        f"dropped: {report.dropped_train_prompt} whose prompt is in {args.train}, "
        f"{report.dropped_duplicate_prompt} repeating a kept prompt"
    )
    if report.agreement_with_file_label is not None:
        print(
            f"{report.kept_with_file_label} kept rows carry a label in {args.unlabelled} (not used): the "
            f"teacher's argmax agrees with {report.agreement_with_file_label:.1%} of them"
        )
    if pseudo.is_empty():
        raise DataError(f"no pseudo-labelled row is left of {args.unlabelled}; nothing written to {args.out}")
    save_pseudo_labels(pseudo, args.out, report.teachers)
    counts = pseudo["label"].value_counts().sort("label")
    spread = ", ".join(f"{LABEL_COLUMNS[label]} {count}" for label, count in counts.iter_rows())
    print(
        f"{pseudo.height} pseudo rows ({spread}) -> {args.out}; train with --set train.pseudo_path={args.out}"
    )
    return 0


def _check_outputs(outputs: list[str | None], inputs: list[tuple[str, str | None]]) -> None:
    """Before any work: no output may be, contain or lie inside an input (it would be destroyed;
    fileio.check_output_apart), nor be a symlink / device / folder, and no two outputs may be one file."""
    given = [output for output in outputs if output]
    for index, output in enumerate(given):
        check_output_apart(output, inputs)
        check_output_target(output)
        check_not_an_input(output, [(f"output {other}", other) for other in given[:index]])


def demo(args: argparse.Namespace) -> int:
    from kaggle_utils.demo import figures as demo_figures
    from kaggle_utils.demo import run as demo_module

    dialect = get_dialect(args.format)  # an unknown name: one-line usage error before any work
    real_only = [
        flag
        for flag, value in (("--max-steps", args.max_steps), ("--max-length", args.max_length))
        if value is not None
    ]
    if real_only and not args.real:
        raise UsageError(f"demo: {' and '.join(real_only)} only apply with --real")
    if args.real and (args.record or args.baseline_only):
        raise UsageError(
            "demo: --real trains the real model; --record and --baseline-only are the tiny demo's"
        )
    n_train = (
        args.n_train
        if args.n_train is not None
        else (demo_module.REAL_N_TRAIN if args.real else DEMO_N_TRAIN)
    )
    n_test = (
        args.n_test if args.n_test is not None else (demo_module.REAL_N_TEST if args.real else DEMO_N_TEST)
    )
    if args.record and (
        args.baseline_only
        or (n_train, n_test, args.seed) != (DEMO_N_TRAIN, DEMO_N_TEST, 0)
        or dialect.name != "lmsys"
    ):
        raise UsageError(
            "--record keeps the README's `make demo` figures: use it with the default sizes, seed "
            "and dialect, without --baseline-only"
        )
    if args.real:
        pipeline_config = demo_module.real_demo_config(
            args.model_dir,
            max_steps=args.max_steps if args.max_steps is not None else demo_module.REAL_MAX_STEPS,
            max_length=args.max_length if args.max_length is not None else demo_module.REAL_MAX_LENGTH,
        )
        steps, threads = demo_module.REAL_DEMO_STEPS, None
    else:
        pipeline_config, threads = None, 1
        steps = demo_module.BASELINE_STEPS if args.baseline_only else demo_module.DEMO_STEPS
    report = demo_module.run_demo(
        Path(args.out),
        submission_path=args.submission,
        n_train=n_train,
        n_test=n_test,
        seed=args.seed,
        steps=steps,
        dialect=dialect.name,
        pipeline_config=pipeline_config,
        torch_threads=threads,
    )
    if args.record:
        demo_figures.record(report)
        print(f"figures -> {demo_figures.HEADLINE_PATH} and {demo_figures.README_PATH}")
    return 0
