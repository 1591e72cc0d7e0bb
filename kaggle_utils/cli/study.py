"""Study commands: `qid-study` (QiD against fine-tuning tokens).

Thin: `studies.qid` does the work, imported when the command runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import shlex

from kaggle_utils.cli.run_options import add_run_options, prepare_run
from kaggle_utils.core.console import RUN_LOG


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "qid-study",
        help="fine-tune once per seed, measure QiD (8-bit, 4-bit) at geometric checkpoints, fit QiD ~ D^beta",
    )
    parser.add_argument("--out", required=True, help="directory for qid_study.json/.md/.png and the runs")
    add_run_options(parser, data_required=True)
    parser.add_argument(
        "--fold", type=int, default=0, help="held-out fold the QiD is measured on (default: 0)"
    )
    parser.add_argument("--checkpoints", type=int, default=6, help="geometrically spaced checkpoints (>= 2)")
    parser.add_argument("--first-step", type=int, default=1, help="optimizer step of the first checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (one run each)")
    parser.add_argument("--schemes", nargs="+", default=["int8", "nf4"], choices=("int8", "nf4"))
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for beta's interval")
    parser.set_defaults(handler=qid_study, run_log=RUN_LOG)


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (stored beside the report)."""
    parts = ["python -m kaggle_utils qid-study"]
    options = {
        "config": args.config,
        "out": args.out,
        "train": args.train,
        "sample-rows": args.sample_rows,
        "folds": args.folds,
        "fold": args.fold,
        "checkpoints": args.checkpoints,
        "first-step": args.first_step,
        "bootstrap": args.bootstrap,
        "threads": args.threads,
    }
    for name, value in options.items():
        if value is not None:
            parts.append(f"--{name} {shlex.quote(str(value))}")
    parts.append("--seeds " + " ".join(str(s) for s in args.seeds))
    parts.append("--schemes " + " ".join(args.schemes))
    return " ".join(parts)


def qid_study(args: argparse.Namespace) -> int:
    from kaggle_utils.studies.experiment import prepare_experiment
    from kaggle_utils.studies.qid import run_qid_study

    cfg, out_dir, train_path = prepare_run(args)
    # the setup compare-orderings and train share: frame, folds (made or read), tokenizer, the 16-bit base
    experiment = prepare_experiment(cfg, train_path, out_dir, args.folds, fold_ids=[args.fold])
    study_cfg = dataclasses.replace(
        cfg, model=dataclasses.replace(cfg.model, base_model=str(experiment.base_dir))
    )
    result = run_qid_study(
        study_cfg,
        experiment.frame,
        experiment.folds,
        experiment.tokenizer,
        out_dir,
        fold=args.fold,
        n_checkpoints=args.checkpoints,
        first_step=args.first_step,
        seeds=tuple(args.seeds),
        schemes=tuple(args.schemes),
        n_bootstrap=args.bootstrap,
    )
    (out_dir / "COMMAND.txt").write_text(command_line(args) + "\n", encoding="utf-8")
    print(result.answer)
    print(f"report: {out_dir / 'qid_study.md'}")
    return 0
