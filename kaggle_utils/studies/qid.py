"""The QiD study: does a fine-tuned classifier lose more to quantization the longer it is trained?

`run_qid_study(cfg, train_frame, folds, tokenizer, out_dir)` fine-tunes one 16-bit LoRA classifier per seed,
merges and quantizes it (int8, NF4) at geometric checkpoints, measures QiD on the held-out fold against
training tokens D, fits QiD ~ D^beta (`qid_fit.py`) and writes qid_study.json/.md/.png. Method:
docs/DESIGN_NOTES.md, "studies/qid.py".
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import platform
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from kaggle_utils import __version__
from kaggle_utils.core.config import QuantConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.core.metrics import log_loss
from kaggle_utils.models.classifier import predict_probs
from kaggle_utils.models.quantized import quantize_merged
from kaggle_utils.studies.qid_fit import (
    PAPER_BETA,
    SCHEME_LABELS,
    PowerLawFit,
    TrendFit,
    answer_text,
    bootstrap_fit,
    bootstrap_trend,
    qid,
)
from kaggle_utils.text.encode import encode_rows
from kaggle_utils.train.fold_data import split_fold
from kaggle_utils.train.loop import train_fold
from kaggle_utils.train.results import StepInfo
from kaggle_utils.train.steps import examples_per_epoch, planned_steps


@dataclass
class Checkpoint:
    """One seed's model at one optimizer step: tokens seen, held-out log losses and QiD per scheme."""

    seed: int
    step: int
    tokens: int
    log_loss_16bit: float
    log_loss: dict[str, float]  # scheme -> quantized log loss
    qid: dict[str, float]
    seconds: float


@dataclass
class QidStudyResult:
    """The study: every checkpoint, the fit and trend per scheme, the one-paragraph answer, run metadata."""

    checkpoints: list[Checkpoint]
    fits: dict[str, PowerLawFit]
    trends: dict[str, TrendFit]
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "answer": self.answer,
            "paper_beta": PAPER_BETA,
            "fits": {scheme: dataclasses.asdict(fit) for scheme, fit in self.fits.items()},
            "trends": {scheme: dataclasses.asdict(trend) for scheme, trend in self.trends.items()},
            "checkpoints": [dataclasses.asdict(c) for c in self.checkpoints],
            "meta": self.meta,
        }


def checkpoint_steps(total_steps: int, n_checkpoints: int, first_step: int = 1) -> list[int]:
    """Geometrically spaced optimizer steps ending at `total_steps` (duplicates dropped)."""
    if total_steps < 1 or n_checkpoints < 2:
        raise UsageError(
            f"the QiD study needs >= 2 checkpoints over >= 1 step (got {n_checkpoints}, {total_steps})"
        )
    first = max(1, min(first_step, total_steps))
    steps = np.unique(np.round(np.geomspace(first, total_steps, n_checkpoints)).astype(int))
    return [int(s) for s in steps]


# ------------------------------------------------------------------------------------------------ the run


def run_qid_study(
    cfg,
    train_frame,
    folds,
    tokenizer,
    out_dir: str | Path,
    *,
    fold: int = 0,
    n_checkpoints: int = 6,
    first_step: int = 1,
    seeds: Sequence[int] = (42,),
    schemes: Sequence[str] = ("int8", "nf4"),
    n_bootstrap: int = 1000,
    progress: bool = True,
) -> QidStudyResult:
    """Fine-tune (16-bit LoRA) once per seed, measuring QiD at geometric checkpoints; fit and report."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    base_cfg = _study_config(cfg, schemes)
    train_part, val_part = split_fold(train_frame, folds, fold)
    val = encode_rows(val_part, tokenizer, base_cfg.format)
    labels = np.asarray(val.labels, dtype=np.int64)
    n_examples = examples_per_epoch(train_part.height, base_cfg.train)
    steps = checkpoint_steps(planned_steps(n_examples, base_cfg.train), n_checkpoints, first_step)

    checkpoints: list[Checkpoint] = []
    probs: dict[str, list[np.ndarray]] = {"16bit": [], **{s: [] for s in schemes}}
    started = time.perf_counter()
    for seed in seeds:
        run_cfg = copy.deepcopy(base_cfg)
        run_cfg.train.seed = seed

        def on_step(info: StepInfo, seed=seed, model_cfg=run_cfg.model) -> None:
            if info.step not in steps:
                return
            row, measured = _measure_checkpoint(
                info, seed, val.input_ids, labels, tokenizer, schemes, model_cfg
            )
            checkpoints.append(row)
            for name, p in measured.items():
                probs[name].append(p)

        train_fold(
            run_cfg,
            train_frame,
            folds,
            tokenizer,
            out_dir / f"train-seed{seed}",
            fold=fold,
            resume=False,
            on_step=on_step,
            progress=progress,
        )

    fits, trends = _fit_checkpoints(labels, checkpoints, probs, schemes, n_bootstrap)
    result = QidStudyResult(
        checkpoints=checkpoints, fits=fits, trends=trends, answer=answer_text(fits, trends)
    )
    result.meta = study_meta(base_cfg, steps, seeds, len(labels), n_examples, time.perf_counter() - started)
    write_study_report(result, out_dir)
    return result


def _study_config(cfg, schemes: Sequence[str]):
    """`cfg` for the study: fine-tune -> quantize, every training row trained (no inner holdout)."""
    unknown = [s for s in schemes if s not in ("int8", "nf4")]
    if unknown:
        raise UsageError(f"QiD study schemes must be int8 / nf4; got {unknown}")
    base_cfg = copy.deepcopy(cfg)
    base_cfg.train.ordering = "ft-then-quant"
    base_cfg.train.selection = "final"  # the study measures checkpoints as they train
    return base_cfg


def _measure_checkpoint(
    info: StepInfo, seed: int, input_ids, labels: np.ndarray, tokenizer, schemes: Sequence[str], model_cfg
) -> tuple[Checkpoint, dict[str, np.ndarray]]:
    """The training model at this step: its 16-bit held-out log loss and, merged and quantized per scheme,
    each quantized log loss and QiD. Returns the checkpoint and the probabilities by "16bit" / scheme."""
    began = time.perf_counter()
    model = info.model
    was_training = model.training
    p16 = predict_probs(model, input_ids, tokenizer.pad_token_id)
    device = next(model.parameters()).device
    merged = copy.deepcopy(model).merge_and_unload()
    merged.eval()
    row = Checkpoint(
        seed=seed,
        step=info.step,
        tokens=info.tokens_seen,
        log_loss_16bit=log_loss(labels, p16),
        log_loss={},
        qid={},
        seconds=0.0,
    )
    measured = {"16bit": p16}
    for scheme in schemes:
        quantized = quantize_merged(merged, QuantConfig(scheme=scheme), model_cfg, device=device)
        pq = predict_probs(quantized, input_ids, tokenizer.pad_token_id)
        row.log_loss[scheme] = log_loss(labels, pq)
        row.qid[scheme] = qid(labels, p16, pq)
        measured[scheme] = pq
        del quantized
    row.seconds = time.perf_counter() - began
    model.train(was_training)
    return row, measured


def _fit_checkpoints(
    labels: np.ndarray,
    checkpoints: list[Checkpoint],
    probs: dict[str, list[np.ndarray]],
    schemes: Sequence[str],
    n_bootstrap: int,
) -> tuple[dict[str, PowerLawFit], dict[str, TrendFit]]:
    """The power-law fit and the trend of every scheme over all seeds' checkpoints (seeds resampled)."""
    tokens = np.array([c.tokens for c in checkpoints], dtype=np.float64)
    p16 = np.stack(probs["16bit"])
    groups = np.array([c.seed for c in checkpoints])
    fits = {
        scheme: bootstrap_fit(labels, tokens, p16, np.stack(probs[scheme]), n_bootstrap, groups=groups)
        for scheme in schemes
    }
    trends = {
        scheme: bootstrap_trend(labels, tokens, p16, np.stack(probs[scheme]), n_bootstrap, groups=groups)
        for scheme in schemes
    }
    return fits, trends


def study_meta(cfg, steps, seeds, n_val: int, n_train_examples: int, seconds: float) -> dict[str, Any]:
    """When, where and with what the study ran: device, versions, checkpoints, seeds, sizes, config."""
    import torch
    import transformers

    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "device": _device_description(),
        "versions": {
            "kaggle_utils": __version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            **_optional_versions("peft", "bitsandbytes"),
        },
        "checkpoint_steps": steps,
        "seeds": list(seeds),
        "held_out_rows": n_val,
        "train_examples": n_train_examples,
        "total_seconds": seconds,
        "config": _plain(cfg.to_dict()),
    }


def _optional_versions(*names: str) -> dict[str, str]:
    import importlib.metadata

    return {name: importlib.metadata.version(name) for name in names}


def _device_description() -> str:
    import os

    import torch

    if torch.cuda.is_available():
        return f"CUDA {torch.cuda.get_device_name(0)}"
    return (
        f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch threads {torch.get_num_threads()}"
    )


def _plain(value: Any) -> Any:
    """`value` with dict keys as strings and tuples as lists (JSON's form)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_study_report(result: QidStudyResult, out_dir: Path) -> None:
    """qid_study.json, qid_study.png and qid_study.md under `out_dir`."""
    atomic_write_bytes(out_dir / "qid_study.json", json.dumps(result.to_dict(), indent=2).encode("utf-8"))
    plot_study(result, out_dir / "qid_study.png")
    atomic_write_bytes(out_dir / "qid_study.md", study_markdown(result).encode("utf-8"))


def study_markdown(result: QidStudyResult) -> str:
    """qid_study.md: the answer, the fits per scheme and every checkpoint."""
    schemes = list(result.fits)
    lines = [
        "# QiD study: quantization-induced degradation vs fine-tuning tokens",
        "",
        f"**Answer.** {result.answer}",
        "",
        f"Paper (arXiv 2411.17691): QiD ~ D^{PAPER_BETA} over Pythia checkpoints. Here: one 16-bit LoRA "
        "classifier per seed, merged and quantized at each checkpoint; QiD = held-out log loss (quantized) "
        "- log loss (16-bit). Intervals: bootstrap over training seeds and (paired) held-out rows "
        f"({next(iter(result.fits.values())).n_bootstrap} resamples).",
        "",
        "| scheme | beta | 95% CI | points | resamples with all QiD > 0 | QiD per 10x tokens (95% CI) "
        "| mean QiD (95% CI) |",
        "|---|---|---|---|---|---|---|",
    ]
    for scheme in schemes:
        fit = result.fits[scheme]
        beta = "n/a" if fit.beta is None else f"{fit.beta:.3f}"
        ci = (
            "n/a"
            if fit.ci_low is None or math.isnan(fit.ci_low)
            else f"{fit.ci_low:.3f} .. {fit.ci_high:.3f}"
        )
        trend = result.trends[scheme]
        lines.append(
            f"| {SCHEME_LABELS.get(scheme, scheme)} | {beta} | {ci} | {fit.n_points} | "
            f"{fit.identifiable_share:.0%} | {trend.slope_per_decade:+.5f} ({trend.slope_ci[0]:+.5f} .. "
            f"{trend.slope_ci[1]:+.5f}) | {trend.mean_qid:+.5f} ({trend.mean_qid_ci[0]:+.5f} .. "
            f"{trend.mean_qid_ci[1]:+.5f}) |"
        )
    lines += [
        "",
        "| seed | step | tokens | log loss 16-bit | "
        + " | ".join(f"log loss {s} | QiD {s}" for s in schemes)
        + " |",
        "|---" * (4 + 2 * len(schemes)) + "|",
    ]
    for c in result.checkpoints:
        cells = " | ".join(f"{c.log_loss[s]:.5f} | {c.qid[s]:+.5f}" for s in schemes)
        lines.append(f"| {c.seed} | {c.step} | {c.tokens} | {c.log_loss_16bit:.5f} | {cells} |")
    meta = result.meta
    lines += [
        "",
        f"Device: {meta.get('device')}; {meta.get('held_out_rows')} held-out rows, "
        f"{meta.get('train_examples')} training examples, seeds {meta.get('seeds')}, "
        f"{meta.get('total_seconds', 0):.0f} s in all. Versions: {meta.get('versions')}.",
        "",
        "![QiD vs tokens](qid_study.png)",
        "",
    ]
    return "\n".join(lines)


def plot_study(result: QidStudyResult, path: Path) -> None:
    """QiD against tokens on log-log axes per scheme, with the fitted line and the paper's slope."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, len(result.fits), figsize=(5 * len(result.fits), 4), squeeze=False)
    for axis, (scheme, fit) in zip(axes[0], result.fits.items(), strict=True):
        tokens = np.array([c.tokens for c in result.checkpoints], dtype=np.float64)
        values = np.array([c.qid[scheme] for c in result.checkpoints])
        positive = values > 0
        axis.scatter(tokens[positive], values[positive], label="QiD > 0", color="C0")
        if (~positive).any():
            axis.scatter(
                tokens[~positive],
                np.abs(values[~positive]),
                marker="x",
                color="C3",
                label="|QiD| where QiD <= 0",
            )
        grid = np.geomspace(tokens.min(), tokens.max(), 50)
        if fit.beta is not None:
            axis.plot(
                grid, np.exp(fit.intercept) * grid**fit.beta, color="C0", label=f"fit beta={fit.beta:.2f}"
            )
        anchor_values = np.abs(values[values != 0]) if np.any(values != 0) else np.array([1e-6])
        anchor = math.exp(np.mean(np.log(anchor_values)))
        center = math.exp(np.mean(np.log(tokens)))
        axis.plot(
            grid,
            anchor * (grid / center) ** PAPER_BETA,
            "--",
            color="gray",
            label=f"paper slope {PAPER_BETA:.2f}",
        )
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("fine-tuning tokens D")
        axis.set_ylabel("QiD (log loss)")
        axis.set_title(SCHEME_LABELS.get(scheme, scheme))
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
