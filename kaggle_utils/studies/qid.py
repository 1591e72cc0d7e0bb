"""Does a fine-tuned classifier lose more to quantization the longer it is trained? QiD against training tokens.

QiD (quantization-induced degradation, arXiv 2411.17691) = log loss of the quantized model - log loss of the
16-bit model, on the same rows. The paper fits QiD ~ D^beta with beta ~= 0.5251 over Pythia checkpoints (D =
training tokens). Here one LoRA classifier is fine-tuned in 16 bits (the fine-tune -> quantize ordering) and, at
checkpoints spaced geometrically in optimizer steps, merged and quantized (bitsandbytes LLM.int8 and NF4);
both log losses are measured on the held-out fold. D is the number of real (unpadded) fine-tuning tokens seen.

The exponent is fitted by ordinary least squares on (log D, log QiD) over every seed's checkpoints; its
uncertainty by a two-level bootstrap: training seeds drawn with replacement (training noise, when there are
several) and held-out rows drawn with replacement, the same rows for every checkpoint, 16-bit and quantized
model alike (paired evaluation noise). A resample where some QiD <= 0 has no log: it is counted, and when fewer
than `MIN_IDENTIFIABLE` of the resamples give a finite fit, or the point estimate itself has a non-positive
QiD, beta is reported as not identifiable. Because QiD may be negative, a sign-agnostic trend is reported
too: the slope of QiD on log10(D) and the mean QiD, with the same bootstrap.
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
from kaggle_utils.core.metrics import log_loss, row_log_losses
from kaggle_utils.models.classifier import predict_probs
from kaggle_utils.models.quantized import quantize_merged
from kaggle_utils.text.formatting import encode_rows
from kaggle_utils.train.loop import (
    StepInfo,
    examples_per_epoch,
    planned_steps,
    split_fold,
    train_fold,
)

PAPER_BETA = 0.5251  # QiD ~ D^0.5251 (arXiv 2411.17691, GPTQ on Pythia)
MIN_IDENTIFIABLE = 0.9  # share of bootstrap resamples whose QiDs are all > 0
SCHEME_LABELS = {"int8": "8-bit (LLM.int8)", "nf4": "4-bit (NF4)"}


def qid(labels: np.ndarray, probs_16bit: np.ndarray, probs_quantized: np.ndarray) -> float:
    """QiD = log_loss(quantized) - log_loss(16-bit), both with the competition's log loss."""
    return log_loss(labels, probs_quantized) - log_loss(labels, probs_16bit)


@dataclass
class PowerLawFit:
    """log QiD = intercept + beta log D, with a bootstrap percentile interval for beta."""

    beta: float | None
    intercept: float | None
    ci_low: float | None
    ci_high: float | None
    n_points: int
    n_bootstrap: int
    identifiable_share: float  # resamples whose QiDs were all > 0
    identifiable: bool
    reason: str = ""

    def describe(self) -> str:
        if not self.identifiable:
            return f"beta not identifiable ({self.reason})"
        return f"beta = {self.beta:.3f} (95% bootstrap CI {self.ci_low:.3f} .. {self.ci_high:.3f})"


def fit_log_log(tokens: np.ndarray, qids: np.ndarray) -> tuple[float, float] | None:
    """(beta, intercept) of the least-squares line through (log D, log QiD); None if a QiD <= 0."""
    tokens, qids = np.asarray(tokens, dtype=np.float64), np.asarray(qids, dtype=np.float64)
    if len(tokens) < 2 or np.any(qids <= 0) or len(np.unique(tokens)) < 2:
        return None
    beta, intercept = np.polyfit(np.log(tokens), np.log(qids), 1)
    return float(beta), float(intercept)


def _resamples(groups: np.ndarray, n_rows: int, n_bootstrap: int, seed: int):
    """Yield (checkpoint indices, row indices) per resample: training seeds drawn with replacement (training
    noise; a single seed is kept as it is) and held-out rows drawn with replacement (evaluation noise), the same
    rows for every checkpoint, 16-bit and quantized model alike (paired)."""
    rng = np.random.default_rng(seed)
    groups = np.asarray(groups)
    members = [np.flatnonzero(groups == g) for g in np.unique(groups)]
    for _ in range(n_bootstrap):
        drawn = rng.integers(0, len(members), len(members)) if len(members) > 1 else np.zeros(1, dtype=int)
        yield np.concatenate([members[i] for i in drawn]), rng.integers(0, n_rows, n_rows)


def _loss_gap(labels: np.ndarray, probs_16bit: np.ndarray, probs_quantized: np.ndarray) -> np.ndarray:
    """(checkpoints, rows) per-row log loss of the quantized minus the 16-bit model."""
    return np.stack([row_log_losses(labels, p) for p in probs_quantized]) - np.stack(
        [row_log_losses(labels, p) for p in probs_16bit]
    )


def bootstrap_fit(
    labels: np.ndarray,
    tokens: np.ndarray,
    probs_16bit: np.ndarray,
    probs_quantized: np.ndarray,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> PowerLawFit:
    """Fit QiD ~ D^beta on checkpoints k (arrays indexed [k, row, class]) with a bootstrap interval.

    `labels` (n,) are the held-out labels shared by all checkpoints; `groups` (k,) the training seed of each
    checkpoint (None: one run), resampled together with the rows (see `_resamples`).
    """
    gap = _loss_gap(labels, probs_16bit, probs_quantized)
    tokens = np.asarray(tokens, dtype=np.float64)
    groups = np.zeros(len(tokens), dtype=int) if groups is None else np.asarray(groups)
    point_qid = gap.mean(axis=1)
    point = fit_log_log(tokens, point_qid)
    betas = []
    for checkpoints, rows in _resamples(groups, gap.shape[1], n_bootstrap, seed):
        fitted = fit_log_log(tokens[checkpoints], gap[np.ix_(checkpoints, rows)].mean(axis=1))
        if fitted is not None:
            betas.append(fitted[0])
    share = len(betas) / n_bootstrap if n_bootstrap else 0.0
    if point is None:
        negatives = int(np.sum(point_qid <= 0))
        return PowerLawFit(
            None,
            None,
            None,
            None,
            len(tokens),
            n_bootstrap,
            share,
            False,
            f"{negatives} of {len(tokens)} checkpoints have QiD <= 0: no power law to fit",
        )
    low, high = np.percentile(betas, [2.5, 97.5]).tolist() if betas else (math.nan, math.nan)
    identifiable = share >= MIN_IDENTIFIABLE
    reason = (
        ""
        if identifiable
        else (f"only {share:.0%} of bootstrap resamples have every QiD > 0 (QiD within noise of zero)")
    )
    return PowerLawFit(
        point[0], point[1], float(low), float(high), len(tokens), n_bootstrap, share, identifiable, reason
    )


@dataclass
class TrendFit:
    """Sign-agnostic view: QiD = a + slope * log10(D) (defined even when some QiD <= 0), and the mean QiD."""

    slope_per_decade: float
    slope_ci: tuple[float, float]
    mean_qid: float
    mean_qid_ci: tuple[float, float]

    def describe(self) -> str:
        return (
            f"QiD changes by {self.slope_per_decade:+.5f} per 10x tokens (95% CI {self.slope_ci[0]:+.5f} .. "
            f"{self.slope_ci[1]:+.5f}); mean QiD {self.mean_qid:+.5f} ({self.mean_qid_ci[0]:+.5f} .. "
            f"{self.mean_qid_ci[1]:+.5f})"
        )


def bootstrap_trend(
    labels: np.ndarray,
    tokens: np.ndarray,
    probs_16bit: np.ndarray,
    probs_quantized: np.ndarray,
    n_bootstrap: int = 1000,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> TrendFit:
    """Least-squares slope of QiD on log10(D) and the mean QiD, with seed-and-row bootstrap intervals."""
    gap = _loss_gap(labels, probs_16bit, probs_quantized)
    x = np.log10(np.asarray(tokens, dtype=np.float64))
    groups = np.zeros(len(x), dtype=int) if groups is None else np.asarray(groups)

    def slope(xs: np.ndarray, qids: np.ndarray) -> float:
        return float(np.polyfit(xs, qids, 1)[0]) if len(np.unique(xs)) > 1 else math.nan

    point = gap.mean(axis=1)
    slopes, means = [], []
    for checkpoints, rows in _resamples(groups, gap.shape[1], n_bootstrap, seed):
        resampled = gap[np.ix_(checkpoints, rows)].mean(axis=1)
        slopes.append(slope(x[checkpoints], resampled))
        means.append(float(resampled.mean()))
    low_s, high_s = np.nanpercentile(slopes, [2.5, 97.5])
    low_m, high_m = np.percentile(means, [2.5, 97.5])
    return TrendFit(
        slope(x, point), (float(low_s), float(high_s)), float(point.mean()), (float(low_m), float(high_m))
    )


@dataclass
class Checkpoint:
    seed: int
    step: int
    tokens: int
    log_loss_16bit: float
    log_loss: dict[str, float]  # scheme -> quantized log loss
    qid: dict[str, float]
    seconds: float


@dataclass
class QidStudyResult:
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


def answer_text(fits: dict[str, PowerLawFit], trends: dict[str, TrendFit]) -> str:
    """One sentence per scheme: the fitted exponent (or why there is none) and the sign-agnostic trend."""
    parts = []
    for scheme, fit in fits.items():
        label = SCHEME_LABELS.get(scheme, scheme)
        trend = trends[scheme]
        low, high = trend.slope_ci
        direction = (
            "QiD grows with training tokens"
            if low > 0
            else "QiD shrinks with training tokens"
            if high < 0
            else "no trend of QiD with training tokens beyond seed and evaluation noise"
        )
        if not fit.identifiable:
            parts.append(f"{label}: {fit.describe()}; {direction} ({trend.describe()}).")
            continue
        if fit.ci_low <= PAPER_BETA <= fit.ci_high:
            verdict = f"consistent with the paper's {PAPER_BETA:.2f}"
        elif fit.ci_high < PAPER_BETA:
            verdict = f"below the paper's {PAPER_BETA:.2f}"
        else:
            verdict = f"above the paper's {PAPER_BETA:.2f}"
        parts.append(f"{label}: {fit.describe()}, {verdict}; {direction} ({trend.describe()}).")
    return " ".join(parts)


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
    unknown = [s for s in schemes if s not in ("int8", "nf4")]
    if unknown:
        raise UsageError(f"QiD study schemes must be int8 / nf4; got {unknown}")
    base_cfg = copy.deepcopy(cfg)
    base_cfg.train.ordering = "ft-then-quant"
    base_cfg.train.selection = (
        "final"  # the study measures checkpoints as they train; all training rows train
    )
    train_part, val_part = split_fold(train_frame, folds, fold)
    val = encode_rows(val_part, tokenizer, base_cfg.format)
    labels = np.asarray(val.labels, dtype=np.int64)
    pad = tokenizer.pad_token_id
    n_examples = examples_per_epoch(train_part.height, base_cfg.train)
    total = planned_steps(n_examples, base_cfg.train)
    steps = checkpoint_steps(total, n_checkpoints, first_step)

    checkpoints: list[Checkpoint] = []
    probs: dict[str, list[np.ndarray]] = {"16bit": [], **{s: [] for s in schemes}}
    started = time.perf_counter()
    for seed in seeds:
        run_cfg = copy.deepcopy(base_cfg)
        run_cfg.train.seed = seed

        def on_step(info: StepInfo, seed=seed, model_cfg=run_cfg.model) -> None:
            if info.step not in steps:
                return
            began = time.perf_counter()
            model = info.model
            was_training = model.training
            p16 = predict_probs(model, val.input_ids, pad)
            device = next(model.parameters()).device
            merged = copy.deepcopy(model).merge_and_unload()
            merged.eval()
            row = Checkpoint(
                seed=seed,
                step=info.step,
                tokens=info.tokens_seen,
                log_loss_16bit=0.0,
                log_loss={},
                qid={},
                seconds=0.0,
            )

            row.log_loss_16bit = log_loss(labels, p16)
            probs["16bit"].append(p16)
            for scheme in schemes:
                quantized = quantize_merged(merged, QuantConfig(scheme=scheme), model_cfg, device=device)
                pq = predict_probs(quantized, val.input_ids, pad)
                row.log_loss[scheme] = log_loss(labels, pq)
                row.qid[scheme] = qid(labels, p16, pq)
                probs[scheme].append(pq)
                del quantized
            row.seconds = time.perf_counter() - began
            checkpoints.append(row)
            model.train(was_training)

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
    result = QidStudyResult(
        checkpoints=checkpoints, fits=fits, trends=trends, answer=answer_text(fits, trends)
    )
    result.meta = study_meta(base_cfg, steps, seeds, len(labels), n_examples, time.perf_counter() - started)
    write_study_report(result, out_dir)
    return result


def study_meta(cfg, steps, seeds, n_val: int, n_train_examples: int, seconds: float) -> dict[str, Any]:
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
    return f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}"


def _plain(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def write_study_report(result: QidStudyResult, out_dir: Path) -> None:
    atomic_write_bytes(out_dir / "qid_study.json", json.dumps(result.to_dict(), indent=2).encode("utf-8"))
    plot_study(result, out_dir / "qid_study.png")
    atomic_write_bytes(out_dir / "qid_study.md", study_markdown(result).encode("utf-8"))


def study_markdown(result: QidStudyResult) -> str:
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
