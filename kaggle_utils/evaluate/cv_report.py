"""A comparison's numbers: each run from its folds, the common reference, summaries, the winner and its noise.

`aggregate_run` turns one (variant, seed)'s fold records (`experiment.run_fold`) into a run;
`build_report(cfg, chosen, seeds, ...)` fills the common reference, summarises each variant, decides the
winner (`decide_winner`) and returns report.json's form (typed: `comparison_report.ComparisonReport`).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from importlib import metadata
from typing import Any

import numpy as np
import torch

from kaggle_utils import __version__
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.machine import describe_machine
from kaggle_utils.core.metrics import log_loss, row_log_losses
from kaggle_utils.data.dialect_base import Dialect
from kaggle_utils.data.dialects import get_dialect
from kaggle_utils.evaluate.ship import ShippedRun
from kaggle_utils.models.real import base_weights_note
from kaggle_utils.text.template import TEMPLATE_VERSION
from kaggle_utils.variants.registry import Variant

# A winner is declared only when the paired per-row difference exceeds this many standard errors.
NOISE_Z = 2.0


def aggregate_run(variant: Variant, seed: int, folds_out: list[dict], dialect: Dialect | None = None) -> dict:
    """One (variant, seed): CV over all trained folds' OOF rows and the per-fold records; `cv_metric_*` are
    the dialect's competition metric (LMSYS: log loss; WSDM: A/B accuracy) on the same rows."""
    dialect = dialect or get_dialect("lmsys")
    labels = np.concatenate([f["labels"] for f in folds_out])
    p16 = np.concatenate([f["probs_16bit"] for f in folds_out])
    pq = np.concatenate([f["probs_quantized"] for f in folds_out])
    trains = [f["train"] for f in folds_out]
    return {
        "variant": variant.name,
        "ordering": variant.ordering,
        "seed": seed,
        "rows": len(labels),
        "own_reference": own_reference_description(variant),
        "provides_common_reference": variant.common_reference,
        "cv_log_loss_16bit": log_loss(labels, p16),
        "cv_log_loss_quantized": log_loss(labels, pq),
        "gap_vs_own_reference": log_loss(labels, pq) - log_loss(labels, p16),
        # filled by attach_common_reference once every variant of the seed has run
        "cv_log_loss_common_reference": None,
        "qid_vs_common": None,
        "metric": dialect.metric.name,
        "cv_metric_16bit": dialect.metric(labels, p16),
        "cv_metric_quantized": dialect.metric(labels, pq),
        "cv_secondary_quantized": {m.name: m(labels, pq) for m in dialect.secondary_metrics},
        "accuracy_16bit": float((p16.argmax(1) == labels).mean()),
        "accuracy_quantized": float((pq.argmax(1) == labels).mean()),
        "prior_log_loss": float(np.mean([f["prior_log_loss"] for f in folds_out])),
        "train_time_eval_log_loss": _mean_finite([t["best_eval_loss"] for t in trains]),
        "selection": trains[0]["selection"],
        "train_wall_time_s": float(sum(t["wall_time_s"] for t in trains)),
        "train_tokens_per_s": float(np.mean([t["tokens_per_s"] for t in trains])),
        "peak_rss_bytes": max(f["peak_rss_bytes"] or 0 for f in folds_out),
        "peak_cuda_bytes": max(
            (f["peak_cuda_bytes"] for f in folds_out if f["peak_cuda_bytes"]), default=None
        ),
        "trainable_params": trains[0]["trainable_params"],
        "total_params": trains[0]["total_params"],
        "artifact_bytes": int(np.mean([f["artifact_bytes"] for f in folds_out])),
        "inference_rows_per_s": float(np.mean([f["inference_rows_per_s"] for f in folds_out])),
        "steps": trains[0]["total_steps"],
        "per_fold": [_fold_record(f, dialect) for f in folds_out],
        # per-row losses (not in JSON) for the paired noise estimate, and the rows for the ship decision
        "_row_losses_quantized": row_log_losses(labels, pq),
        "_shipped": _shipped_run(variant.name, folds_out, labels, pq),
    }


def _fold_record(fold: dict, dialect: Dialect) -> dict:
    """One fold's entry in a run's `per_fold` (the common-reference fields filled later)."""
    return {
        "fold": fold["fold"],
        "log_loss_16bit": log_loss(fold["labels"], fold["probs_16bit"]),
        "log_loss_quantized": log_loss(fold["labels"], fold["probs_quantized"]),
        "log_loss_common_reference": None,
        "qid_vs_common": None,
        "metric_quantized": dialect.metric(fold["labels"], fold["probs_quantized"]),
        "best_step": fold["train"]["best_step"],
        "history": fold["train"]["history"],
        "class_prior": fold["class_prior"],
        "artifact_dir": fold["artifact_dir"],
        "extras": fold["extras"],
        "notes": fold["notes"],
    }


def _shipped_run(name: str, folds_out: list[dict], labels: np.ndarray, probs: np.ndarray) -> ShippedRun:
    """The run as a ship candidate: its OOF rows, each row's training-part prior, its fold artifacts."""
    has_views = all(
        f.get("views_quantized") is not None and len(f["views_quantized"]) == 2 for f in folds_out
    )
    return ShippedRun(
        name=name,
        ids=[i for f in folds_out for i in f["ids"]],
        labels=labels,
        probs=probs,
        row_priors=np.concatenate([np.tile(f["class_prior"], (len(f["labels"]), 1)) for f in folds_out]),
        artifact_dirs=[f["artifact_dir"] for f in folds_out],
        views=np.concatenate([f["views_quantized"] for f in folds_out], axis=1) if has_views else None,
    )


def own_reference_description(variant: Variant) -> str:
    """What a variant's own "16-bit" reference model is (the one `gap_vs_own_reference` subtracts)."""
    if variant.name == "full-then-quant":
        return "the fully fine-tuned 16-bit model, before quantizing"
    if variant.ordering == "ft-then-quant":
        return "its LoRA merged into the 16-bit base (merged in fp32), before quantizing"
    return (
        "its adapter, trained on the quantized base, applied to the 16-bit base (a mismatch: not a "
        "quantization cost)"
    )


def _mean_finite(values: list[float | None]) -> float | None:
    kept = [v for v in values if v is not None and math.isfinite(v)]
    return float(np.mean(kept)) if kept else None


def attach_common_reference(runs: list[dict]) -> dict:
    """Fill every run's `qid_vs_common` (shipped CV log loss - the common reference's), per seed and per fold.

    The common reference of a seed is the 16-bit model of the first run whose variant has `common_reference`
    (ft-then-quant and its scheme variants); without one the fields stay None. Returns {"variant", "note"}."""
    source = None
    for seed in sorted({run["seed"] for run in runs}):
        reference = next(
            (run for run in runs if run["seed"] == seed and run.get("provides_common_reference")), None
        )
        if reference is None:
            continue
        source = source or reference["variant"]
        by_fold = {f["fold"]: f["log_loss_16bit"] for f in reference["per_fold"]}
        for run in (r for r in runs if r["seed"] == seed):
            if run["rows"] != reference["rows"]:
                raise UsageError(
                    f"{run['variant']} seed {seed} has {run['rows']} OOF rows, the common reference "
                    f"{reference['rows']}: they were not scored on the same rows"
                )
            run["cv_log_loss_common_reference"] = reference["cv_log_loss_16bit"]
            run["qid_vs_common"] = run["cv_log_loss_quantized"] - reference["cv_log_loss_16bit"]
            for fold in run["per_fold"]:
                if fold["fold"] in by_fold:
                    fold["log_loss_common_reference"] = by_fold[fold["fold"]]
                    fold["qid_vs_common"] = fold["log_loss_quantized"] - by_fold[fold["fold"]]
    if source is None:
        return {
            "variant": None,
            "note": "no common reference: run ft-then-quant (or ft-then-quant-int8/-nf4) "
            "in the same comparison to get qid_vs_common",
        }
    return {
        "variant": source,
        "note": f"the 16-bit LoRA model of {source} (fine-tune -> quantize), merged in "
        "fp32, on the same folds and seed",
    }


SUMMARY_METRICS: tuple[str, ...] = (
    "cv_log_loss_16bit",
    "cv_log_loss_quantized",
    "cv_log_loss_common_reference",
    "qid_vs_common",
    "gap_vs_own_reference",
    "accuracy_16bit",
    "accuracy_quantized",
    "cv_metric_16bit",
    "cv_metric_quantized",
    "train_time_eval_log_loss",
    "train_wall_time_s",
    "train_tokens_per_s",
    "peak_rss_bytes",
    "peak_cuda_bytes",
    "trainable_params",
    "artifact_bytes",
    "inference_rows_per_s",
)


def _summarise(runs: list[dict], variant: Variant) -> dict:
    return summarise_variant(runs, variant.name, variant.ordering, variant.description)


def summarise_variant(runs: list[dict], name: str, ordering: str, description: str) -> dict:
    """Mean (and std over seeds) of every SUMMARY_METRICS value of one variant's runs."""
    mine = [run for run in runs if run["variant"] == name]
    summary: dict[str, Any] = {
        "variant": name,
        "ordering": ordering,
        "description": description,
        "seeds": [run["seed"] for run in mine],
        "own_reference": mine[0].get("own_reference") if mine else None,
    }
    for metric in SUMMARY_METRICS:
        values = [run[metric] for run in mine if run.get(metric) is not None]
        if not values:
            summary[metric] = None
            continue
        summary[metric] = {
            "mean": float(np.mean(values)),
            "std": float(np.std(values, ddof=1)) if len(values) > 1 else None,
        }
    return summary


def decide_winner(runs: list[dict], names: list[str]) -> dict:
    """The variant with the lowest mean quantized CV log loss, and whether its lead on the runner-up is noise.

    Ranked by each run's per-row losses (`_row_losses_quantized`; report.json's figure only for a run without
    rows); the lead counts when it exceeds NOISE_Z paired standard errors over rows and over seeds."""
    means = {
        name: float(np.mean([_quantized_loss(r) for r in runs if r["variant"] == name])) for name in names
    }
    ranked = sorted(means, key=means.get)
    if len(ranked) < 2:
        return {
            "winner": ranked[0],
            "runner_up": None,
            "difference": None,
            "within_noise": None,
            "statement": f"only {ranked[0]} was run: nothing to compare",
        }
    best, second = ranked[0], ranked[1]
    difference, noise, se_rows, se_seeds, n_seeds = _paired_noise(runs, best, second)
    within = difference <= NOISE_Z * noise
    statement = (
        f"{best} has the lower quantized CV log loss by {difference:.4f} "
        f"(paired standard error {noise:.4f} over {n_seeds} seed(s))"
        + (
            ": the difference is within noise, so neither ordering wins on this data."
            if within
            else f": {best} wins."
        )
    )
    return {
        "winner": best,
        "runner_up": second,
        "difference": difference,
        "standard_error": noise,
        "standard_error_rows": se_rows,
        "standard_error_seeds": se_seeds,
        "within_noise": bool(within),
        "statement": statement,
    }


def _paired_noise(runs: list[dict], best: str, second: str) -> tuple[float, float, float, float | None, int]:
    """(mean difference, noise, standard error over rows, over seeds, seeds) of `second`'s per-row losses
    minus `best`'s, paired per seed on the same OOF rows."""
    per_seed, row_se = [], []
    for seed in sorted({r["seed"] for r in runs}):
        a = next(r for r in runs if r["variant"] == best and r["seed"] == seed)
        b = next(r for r in runs if r["variant"] == second and r["seed"] == seed)
        diff = b["_row_losses_quantized"] - a["_row_losses_quantized"]
        per_seed.append(float(diff.mean()))
        row_se.append(float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf)
    se_rows = float(np.sqrt(np.mean(np.square(row_se))) / math.sqrt(len(per_seed)))
    se_seeds = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 else None
    return float(np.mean(per_seed)), max(se_rows, se_seeds or 0.0), se_rows, se_seeds, len(per_seed)


def _quantized_loss(run: dict) -> float:
    """A run's quantized CV log loss from its per-row losses (report.json's figure when it has none)."""
    rows = run.get("_row_losses_quantized")
    return float(np.mean(rows)) if rows is not None else float(run["cv_log_loss_quantized"])


def build_report(
    cfg,
    chosen,
    seeds,
    fold_ids,
    runs,
    frame,
    folds_path,
    folds_hash,
    device,
    began,
    model: dict | None = None,
) -> dict:
    """The report's JSON form from the runs: decision, common reference, summaries, setup (with `model`: what
    `model_config.describe_checkpoint` says of the base) and environment."""
    names = [variant.name for variant in chosen]
    decision = decide_winner(runs, names)
    common = attach_common_reference(runs)
    dialect = get_dialect(cfg.data.format)
    return {
        "question": "fine-tune -> quantize vs quantize -> fine-tune: which ships the better classifier?",
        "dialect": dialect.describe(),
        "decision": decision,
        "common_reference": common,
        "variants": [_summarise(runs, variant) for variant in chosen],
        "runs": [{k: v for k, v in run.items() if not k.startswith("_")} for run in runs],
        "setup": {
            "rows": frame.height,
            "folds_file": str(folds_path),
            "folds_file_hash": folds_hash,
            "folds_trained": fold_ids,
            "seeds": list(seeds),
            "base_model": cfg.model.base_model,
            "base_model_note": base_weights_note(cfg.model.base_model),  # e.g. GGUF-rounded weights
            **({"model": model} if model is not None else {}),
            "max_length": cfg.format.max_length,
            "template_version": TEMPLATE_VERSION,  # the runs' artifacts refuse any other
            "format": dataclasses.asdict(cfg.format),
            "lora": dataclasses.asdict(cfg.lora),
            "quant": dataclasses.asdict(cfg.quant),
            "train": dataclasses.asdict(cfg.train),
            "tta_swap": cfg.inference.tta_swap,
        },
        "environment": _environment(device),
        "total_time_s": time.perf_counter() - began,
        "definitions": _definitions(cfg, dialect),
    }


def _environment(device: torch.device) -> dict[str, Any]:
    """The device, machine and library versions the runs ran on."""
    import transformers

    try:  # versions from the installed metadata: importing bitsandbytes would ask the Hub for a CPU kernel
        versions = {name: metadata.version(name) for name in ("bitsandbytes", "peft")}
    except metadata.PackageNotFoundError:
        versions = {}
    return {
        "device": _describe_device(device),
        **describe_machine(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        **versions,
        "kaggle_utils": __version__,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


def _definitions(cfg, dialect: Dialect) -> dict[str, str]:
    """What each reported figure means (report.md's Definitions section)."""
    metric = dialect.metric
    return {
        "cv_log_loss_16bit": "held-out log loss of the variant's own 16-bit reference (`own_reference`: "
        "ft-then-quant: its LoRA merged in fp32 before quantizing; quant-then-ft and the "
        "other QLoRA-style variants: the adapter trained on the quantized base, applied "
        "to the 16-bit base)",
        "cv_log_loss_quantized": "held-out log loss of the shipped artifact, reloaded from disk",
        "cv_metric_quantized": f"the competition metric of dialect '{dialect.name}' ({metric.name}, "
        f"{'higher' if metric.higher_is_better else 'lower'} is better) of the "
        "shipped artifact on the same held-out rows; the winner is still chosen by log "
        "loss (a proper score, far less noisy than accuracy on a few hundred rows)",
        "cv_metric_16bit": "the same metric for the variant's own 16-bit reference",
        "cv_log_loss_common_reference": "held-out log loss of the common reference: the 16-bit LoRA model "
        "of fine-tune -> quantize merged in fp32, same folds and seed",
        "qid_vs_common": "cv_log_loss_quantized - cv_log_loss_common_reference: what each shipped model "
        "loses against one common 16-bit model (comparable across orderings)",
        "gap_vs_own_reference": "cv_log_loss_quantized - cv_log_loss_16bit. For ft-then-quant variants "
        "the quantization-induced degradation (QiD); for QLoRA-style variants the gap "
        "between the adapter on its own quantized base and on the 16-bit base (the "
        "mismatch makes it usually negative): not a QiD",
        "train_time_eval_log_loss": f"loss at the shipped step on the training-time evaluation set "
        f"(selection '{cfg.train.selection}': "
        + (
            "the inner holdout of the training part"
            if cfg.train.selection == "inner"
            else "a sample of the held-out fold, used for the learning curve only"
        )
        + "); the reported fold itself is scored once, by the shipped weights",
        "peak_rss_bytes": "peak resident memory of the process during training incl. model building",
        "inference_rows_per_s": "held-out rows per second of the shipped model"
        + (" (both TTA views)" if cfg.inference.tta_swap else ""),
    }


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"CUDA {props.name} (cc {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), no GPU"
    )
