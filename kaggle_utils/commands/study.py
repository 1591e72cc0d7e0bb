"""Study commands: `qid-study` (QiD against fine-tuning tokens). Thin: kaggle_utils.qaware does the work."""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path

from kaggle_utils.errors import UsageError


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "qid-study",
        help="fine-tune once per seed, measure QiD (8-bit, 4-bit) at geometric checkpoints, fit QiD ~ D^beta",
    )
    parser.add_argument("--config", help="pipeline YAML (PipelineConfig); default: the built-in defaults")
    parser.add_argument("--out", required=True, help="directory for qid_study.json/.md/.png and the runs")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--train", help="competition training file (CSV / parquet)")
    source.add_argument("--sample-rows", type=int, help="generate this many competition-format rows instead")
    parser.add_argument("--folds", help="folds parquet (default: made from the config's fold settings)")
    parser.add_argument("--checkpoints", type=int, default=6, help="geometrically spaced checkpoints (>= 2)")
    parser.add_argument("--first-step", type=int, default=1, help="optimizer step of the first checkpoint")
    parser.add_argument("--seeds", type=int, nargs="+", default=[42], help="training seeds (one run each)")
    parser.add_argument("--schemes", nargs="+", default=["int8", "nf4"], choices=("int8", "nf4"))
    parser.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for beta's interval")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.set_defaults(handler=qid_study)


def load_config(path: str | None):
    from kaggle_utils.config import PipelineConfig

    if path is None:
        return PipelineConfig()
    if not Path(path).is_file():
        raise UsageError(f"config file {path} does not exist")
    try:
        return PipelineConfig.from_yaml(path)
    except (ValueError, TypeError) as error:
        raise UsageError(f"{path}: {error}") from error


def prepare_study_inputs(cfg, out_dir: Path, train: str | None, sample_rows: int | None, folds_path: str | None):
    """(frame, folds, tokenizer): the training rows, their folds and the tokenizer (local or trained here)."""
    from kaggle_utils.data import load_competition
    from kaggle_utils.folds import load_folds, make_folds, save_folds
    from kaggle_utils.tokenizer import load_tokenizer, train_demo_tokenizer

    if sample_rows is not None:
        from kaggle_utils.sample import generate_competition_files

        if sample_rows < 50:
            raise UsageError(f"--sample-rows {sample_rows} is too few for a held-out fold; use >= 50")
        files = generate_competition_files(out_dir / "data", n_train=sample_rows, n_test=10, seed=0)
        train = str(files.train_csv)
    frame = load_competition(train, cfg.data, split="train").frame
    if folds_path:
        folds = load_folds(folds_path)
    else:
        folds = make_folds(frame, cfg.folds)
        save_folds(folds, out_dir / "folds.parquet")
    if cfg.format.tokenizer_path:
        tokenizer = load_tokenizer(cfg.format.tokenizer_path)
    else:
        texts = (turn for column in ("prompt", "response_a", "response_b") for turns in frame[column] for turn in turns)
        tokenizer = train_demo_tokenizer(texts, out_dir / "tokenizer")  # as compare-orderings trains it
    return frame, folds, tokenizer


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this run, rebuilt from the parsed options (stored beside the report)."""
    parts = ["python -m kaggle_utils qid-study"]
    options = {"config": args.config, "out": args.out, "train": args.train, "sample-rows": args.sample_rows,
               "folds": args.folds, "checkpoints": args.checkpoints, "first-step": args.first_step,
               "bootstrap": args.bootstrap, "threads": args.threads}
    for name, value in options.items():
        if value is not None:
            parts.append(f"--{name} {shlex.quote(str(value))}")
    parts.append("--seeds " + " ".join(str(s) for s in args.seeds))
    parts.append("--schemes " + " ".join(args.schemes))
    return " ".join(parts)


def qid_study(args: argparse.Namespace) -> int:
    import torch

    from kaggle_utils.qaware.qid_study import run_qid_study

    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = load_config(args.config)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    frame, folds, tokenizer = prepare_study_inputs(cfg, out_dir, args.train, args.sample_rows, args.folds)
    result = run_qid_study(
        cfg, frame, folds, tokenizer, out_dir,
        n_checkpoints=args.checkpoints, first_step=args.first_step, seeds=tuple(args.seeds),
        schemes=tuple(args.schemes), n_bootstrap=args.bootstrap,
    )
    (out_dir / "COMMAND.txt").write_text(command_line(args) + "\n", encoding="utf-8")
    print(result.answer)
    print(f"report: {out_dir / 'qid_study.md'}")
    return 0
