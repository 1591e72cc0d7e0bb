"""The comparison report: a run's numbers from its folds, the common reference, the summaries, the winner with
its noise, and the report's Markdown and plots.

`aggregate_run` turns one (variant, seed)'s fold records (`experiment.run_fold`) into a run record;
`attach_common_reference` fills every run's QiD against the common 16-bit reference; `summarise_variant` gives
mean ± std over seeds; `decide_winner` names the lowest shipped CV log loss and whether its lead is noise;
`build_report` assembles everything into a `ComparisonReport`.

`ComparisonReport` is the typed report: its runs (`RunRecord`) and their folds (`FoldRecord`) are read by
attribute (`report.run("ft-then-quant").folds[0].artifact_dir`, `report.shipped_artifact`); `to_dict()` is the
`report.json` written to disk (unchanged in shape, so reports written before read back with `from_dict`).
`render_markdown`, `plot_report` and `plot_learning_curves` draw the serialised form (a report read from disk
draws exactly as the run that wrote it).
"""

from __future__ import annotations

import dataclasses
import math
import platform
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch

from kaggle_utils import __version__
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.machine import describe_machine
from kaggle_utils.core.metrics import log_loss, row_log_losses
from kaggle_utils.data.dialects import Dialect, get_dialect
from kaggle_utils.evaluate.ship import ShippedRun
from kaggle_utils.models.real import base_weights_note
from kaggle_utils.text.formatting import TEMPLATE_VERSION
from kaggle_utils.variants.registry import Variant

# A winner is declared only when the paired per-row difference exceeds this many standard errors.
NOISE_Z = 2.0


def aggregate_run(variant: Variant, seed: int, folds_out: list[dict], dialect: Dialect | None = None) -> dict:
    """One (variant, seed): CV over all trained folds' OOF rows, and the per-fold records; `cv_metric_*` are
    the competition dialect's metric (LMSYS: log loss again; WSDM: A/B accuracy) on the same rows."""

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
        "per_fold": [
            {
                "fold": f["fold"],
                "log_loss_16bit": log_loss(f["labels"], f["probs_16bit"]),
                "log_loss_quantized": log_loss(f["labels"], f["probs_quantized"]),
                "log_loss_common_reference": None,
                "qid_vs_common": None,
                "metric_quantized": dialect.metric(f["labels"], f["probs_quantized"]),
                "best_step": f["train"]["best_step"],
                "history": f["train"]["history"],
                "class_prior": f["class_prior"],
                "artifact_dir": f["artifact_dir"],
                "extras": f["extras"],
                "notes": f["notes"],
            }
            for f in folds_out
        ],
        # per-row losses (not written to JSON) for the paired noise estimate, and the rows for the ship decision
        "_row_losses_quantized": row_log_losses(labels, pq),
        "_shipped": ShippedRun(
            name=variant.name,
            ids=[i for f in folds_out for i in f["ids"]],
            labels=labels,
            probs=pq,
            row_priors=np.concatenate([np.tile(f["class_prior"], (len(f["labels"]), 1)) for f in folds_out]),
            artifact_dirs=[f["artifact_dir"] for f in folds_out],
            views=(
                np.concatenate([f["views_quantized"] for f in folds_out], axis=1)
                if all(
                    f.get("views_quantized") is not None and len(f["views_quantized"]) == 2 for f in folds_out
                )
                else None
            ),
        ),
    }


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
    """Fill every run's `qid_vs_common` = shipped CV log loss - the common reference's, per seed and per fold.

    The common reference of a seed is the 16-bit LoRA model of fine-tune -> quantize merged in fp32, from the
    first run of that seed whose variant provides it (`Variant.common_reference`: ft-then-quant or its scheme
    variants). It is not trained separately: without such a variant in the comparison the fields stay None and
    the returned note says so. Runs are compared on identical rows (same folds file and folds trained).
    Returns {"variant": name or None, "note": text}.
    """
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
    """The variant with the lowest mean quantized CV log loss (what ships), and whether its lead is noise.

    The ranking and the difference come from the same numbers: each run's per-row losses
    (`_row_losses_quantized`, whose mean is its CV log loss), so a recorded `cv_log_loss_quantized` (edited, or
    NaN) cannot reverse the order the rows give; it is used only for a run without rows.
    Noise: the paired per-row loss difference to the runner-up on the same OOF rows, per seed; the lead counts
    when its mean exceeds NOISE_Z standard errors (rows) and, with several seeds, NOISE_Z standard errors of the
    per-seed differences as well.
    """
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
    per_seed, row_se = [], []
    for seed in sorted({r["seed"] for r in runs}):
        a = next(r for r in runs if r["variant"] == best and r["seed"] == seed)
        b = next(r for r in runs if r["variant"] == second and r["seed"] == seed)
        diff = b["_row_losses_quantized"] - a["_row_losses_quantized"]
        per_seed.append(float(diff.mean()))
        row_se.append(float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf)
    difference = float(np.mean(per_seed))
    se_rows = float(np.sqrt(np.mean(np.square(row_se))) / math.sqrt(len(per_seed)))
    se_seeds = float(np.std(per_seed, ddof=1) / math.sqrt(len(per_seed))) if len(per_seed) > 1 else None
    noise = max(se_rows, se_seeds or 0.0)
    within = difference <= NOISE_Z * noise
    statement = (
        f"{best} has the lower quantized CV log loss by {difference:.4f} "
        f"(paired standard error {noise:.4f} over {len(per_seed)} seed(s))"
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
    """The report's JSON form from the runs: decision, common reference, summaries, setup (with `model`, what
    `model_config.describe_checkpoint` says of the base), environment (with the machine)."""
    import transformers

    names = [variant.name for variant in chosen]
    decision = decide_winner(runs, names)
    common = attach_common_reference(runs)
    try:  # versions from the installed metadata: importing bitsandbytes would ask the Hub for a CPU kernel
        versions = {name: metadata.version(name) for name in ("bitsandbytes", "peft")}
    except metadata.PackageNotFoundError:
        versions = {}
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
            "base_model_note": _base_weights_note(cfg.model.base_model),  # e.g. GGUF-rounded weights
            **({"model": model} if model is not None else {}),
            "max_length": cfg.format.max_length,
            "template_version": _template_version(),
            "format": dataclasses.asdict(cfg.format),
            "lora": dataclasses.asdict(cfg.lora),
            "quant": dataclasses.asdict(cfg.quant),
            "train": dataclasses.asdict(cfg.train),
            "tta_swap": cfg.inference.tta_swap,
        },
        "environment": {
            "device": _describe_device(device),
            **describe_machine(),
            "torch_threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            **versions,
            "kaggle_utils": __version__,
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        },
        "total_time_s": time.perf_counter() - began,
        "definitions": {
            "cv_log_loss_16bit": "held-out log loss of the variant's own 16-bit reference (`own_reference`: "
            "ft-then-quant: its LoRA merged in fp32 before quantizing; quant-then-ft and the "
            "other QLoRA-style variants: the adapter trained on the quantized base, applied "
            "to the 16-bit base)",
            "cv_log_loss_quantized": "held-out log loss of the shipped artifact, reloaded from disk",
            "cv_metric_quantized": f"the competition metric of dialect '{dialect.name}' ({dialect.metric.name}, "
            f"{'higher' if dialect.metric.higher_is_better else 'lower'} is better) of the "
            "shipped artifact on the same held-out rows; the winner is still chosen by log "
            "loss (a proper score, far less noisy than accuracy on a few hundred rows)",
            "cv_metric_16bit": "the same metric for the variant's own 16-bit reference",
            "cv_log_loss_common_reference": "held-out log loss of the common reference: the 16-bit LoRA model of "
            "fine-tune -> quantize merged in fp32, same folds and seed",
            "qid_vs_common": "cv_log_loss_quantized - cv_log_loss_common_reference: what each shipped model loses "
            "against one common 16-bit model (comparable across orderings)",
            "gap_vs_own_reference": "cv_log_loss_quantized - cv_log_loss_16bit. For ft-then-quant variants the "
            "quantization-induced degradation (QiD); for QLoRA-style variants the gap "
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
        },
    }


def _describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        return f"CUDA {props.name} (cc {props.major}.{props.minor}, {props.total_memory / 2**30:.0f} GiB)"
    return (
        f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), no GPU"
    )


def _base_weights_note(base_model: str) -> str | None:
    return base_weights_note(base_model)


def _template_version() -> str:
    """The prompt template / truncation version the runs encoded with (their artifacts refuse any other)."""
    return TEMPLATE_VERSION


# ------------------------------------------------------------------------------------------------ outputs


def _serialised(report: ComparisonReport | dict) -> dict:
    """The JSON form the drawing functions read (a report read from disk draws as the run that wrote it)."""
    return report.to_dict() if isinstance(report, ComparisonReport) else report


def _fmt(stat: dict | None, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    if stat is None:
        return "n/a"
    mean = stat["mean"] / scale
    text = f"{mean:.{digits}f}"
    if stat.get("std"):  # None (one seed) or 0 (a count that cannot vary) shows no spread
        text += f" ± {stat['std'] / scale:.{digits}f}"
    return text + unit


def render_markdown(report: ComparisonReport | dict) -> str:
    """report.md: the decision, the comparison table, what ships, definitions and the per-fold table."""
    report = _serialised(report)
    setup, env = report["setup"], report["environment"]
    lines = [
        "# Fine-tune → quantize vs quantize → fine-tune",
        "",
        f"**{report['decision']['statement']}**",
        "",
        *[f"Skipped `{name}`: {why}" for name, why in report.get("skipped_variants", {}).items()],
        *([""] if report.get("skipped_variants") else []),
        f"Device: {env['device']}. {setup['rows']} training rows, folds {setup['folds_trained']} of "
        f"`{Path(setup['folds_file']).name}` (sha256 {setup['folds_file_hash'][:12]}…), seeds {setup['seeds']}, "
        f"base `{Path(setup['base_model']).name}`, max length {setup['max_length']}, "
        f"LoRA r{setup['lora']['r']}/α{setup['lora']['alpha']}, quant {setup['quant']['scheme']}, "
        f"swap TTA {'on' if setup['tta_swap'] else 'off'}. Total time {report['total_time_s']:.0f} s.",
        *([f"Base weights: {setup['base_model_note']}."] if setup.get("base_model_note") else []),
        "",
        f"Common reference: {report.get('common_reference', {}).get('note', 'n/a')}.",
        "",
        "| variant | CV log loss shipped | QiD vs common reference | own 16-bit reference | shipped − own reference "
        "| accuracy (shipped) | eval in training at the shipped step "
        "| train wall time (s) | train tokens/s | peak RSS (MB) | peak CUDA (MB) | trainable params "
        "| artifact (MB) | inference rows/s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for v in report["variants"]:
        lines.append(
            f"| {v['variant']} | {_fmt(v['cv_log_loss_quantized'])} | {_fmt(v.get('qid_vs_common'))} "
            f"| {_fmt(v['cv_log_loss_16bit'])} | {_fmt(v.get('gap_vs_own_reference'))} "
            f"| {_fmt(v['accuracy_quantized'], 3)} | {_fmt(v['train_time_eval_log_loss'])} "
            f"| {_fmt(v['train_wall_time_s'], 1)} | {_fmt(v['train_tokens_per_s'], 0)} "
            f"| {_fmt(v['peak_rss_bytes'], 0, 1e6)} | {_fmt(v['peak_cuda_bytes'], 0, 1e6)} "
            f"| {_fmt(v['trainable_params'], 0)} | {_fmt(v['artifact_bytes'], 2, 1e6)} "
            f"| {_fmt(v['inference_rows_per_s'], 1)} |"
        )
    lines += _metric_lines(report)
    priors = sorted({round(run["prior_log_loss"], 4) for run in report["runs"]})
    lines += [
        "",
        f"Class-prior log loss on the same held-out rows: {', '.join(map(str, priors))} (uniform: 1.0986).",
        "",
        "Own 16-bit reference of each variant:",
        "",
        *[f"- `{v['variant']}`: {v.get('own_reference') or 'n/a'}" for v in report["variants"]],
        "",
        "## What ships",
        "",
        *_ship_lines(report),
        "## Definitions",
        "",
        *[f"- `{key}`: {text}" for key, text in report["definitions"].items()],
        "",
        "## Per fold",
        "",
        "| variant | seed | fold | log loss own 16-bit reference | log loss shipped | QiD vs common | shipped step "
        "| extras |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for run in report["runs"]:
        for fold in run["per_fold"]:
            extras = "; ".join(
                f"{k}: log loss {x['log_loss']:.4f}, largest probability change vs shipped "
                f"{x['max_abs_prob_diff_vs_shipped']:.4f}"
                for k, x in fold["extras"].items()
            )
            common = fold.get("qid_vs_common")
            lines.append(
                f"| {run['variant']} | {run['seed']} | {fold['fold']} | {fold['log_loss_16bit']:.4f} "
                f"| {fold['log_loss_quantized']:.4f} | {'n/a' if common is None else f'{common:+.4f}'} "
                f"| {fold['best_step']} | {extras or '-'} |"
            )
    lines += [
        "",
        f"Versions: torch {env['torch']}, transformers {env['transformers']}, "
        f"peft {env.get('peft', '?')}, bitsandbytes {env.get('bitsandbytes', '?')}; {env['date']}"
        + (
            f"; {env['cpu']} ({env['cores']} cores, {env['torch_threads']} torch threads)"
            if "cpu" in env
            else ""
        )
        + ".",
        "",
    ]
    model = report["setup"].get("model")
    if model:
        hashes = ", ".join(f"{name} {digest[:12]}" for name, digest in model["weights_sha256"].items())
        lines += [
            f"Model: {model['model_type']}, {model['parameters']:,} parameters, vocabulary "
            f"{model['vocab_size']:,}, stored {model['stored_dtype']}; weights sha256 {hashes}; "
            f"{model['origin']}.",
            "",
        ]
    return "\n".join(lines)


def _ship_lines(report: dict) -> list[str]:
    ship = report.get("ship")
    if not ship:
        return ["No ship decision in this report.", ""]
    lines = [
        "Every candidate on the same OOF rows; calibrations and blend weights scored cross-fitted (fitted on "
        "the other prompt-group splits of the OOF rows), so no figure is the in-sample one its fit optimised.",
        "",
        "| rank | candidate | kind | complexity | CV log loss | note |",
        "|---|---|---|---|---|---|",
    ]
    for rank, candidate in enumerate(ship["ranking"], 1):
        complexity = candidate.get("complexity", "-")
        lines.append(
            f"| {rank} | {candidate['name']} | {candidate['kind']} | {complexity} "
            f"| {candidate['cv_log_loss']:.4f} | {candidate['note']} |"
        )
    if ship.get("selection_rule"):
        lines += ["", f"Rule: {ship['selection_rule']}."]
    return [
        *lines,
        "",
        f"**{ship['statement']}**; shipped: `{ship['artifact']}`.",
        "",
        f"![reliability]({ship.get('reliability_png', 'reliability.png')})",
        "",
    ]


def _metric_lines(report: dict) -> list[str]:
    """The competition metric per variant, when the dialect's metric is not log loss itself (WSDM: accuracy)."""
    dialect = report.get("dialect") or {}
    if not dialect or dialect.get("metric") == "log_loss":
        return []
    better = "higher" if dialect.get("higher_is_better") else "lower"
    lines = [
        "",
        f"Competition metric ({dialect['name']}): {dialect['metric']}, {better} is better "
        "(the winner above is chosen by log loss).",
        "",
        f"| variant | {dialect['metric']} shipped | {dialect['metric']} own 16-bit reference | secondary (shipped) |",
        "|---|---|---|---|",
    ]
    for v in report["variants"]:
        secondary = {}
        for run in report["runs"]:
            if run["variant"] == v["variant"]:
                for name, value in (run.get("cv_secondary_quantized") or {}).items():
                    secondary.setdefault(name, []).append(value)
        text = ", ".join(f"{name} {np.mean(values):.4f}" for name, values in secondary.items()) or "-"
        lines.append(
            f"| {v['variant']} | {_fmt(v.get('cv_metric_quantized'))} | {_fmt(v.get('cv_metric_16bit'))} "
            f"| {text} |"
        )
    return lines


def plot_report(report: ComparisonReport | dict, path: str | Path) -> Path:
    """Bar chart: CV log loss (16-bit vs quantized, ± std over seeds), QiD, training time, artifact size."""
    report = _serialised(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    variants = report["variants"]
    names = [v["variant"] for v in variants]
    x = np.arange(len(names))

    def series(metric: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        means = np.array([(v.get(metric) or {}).get("mean", np.nan) / scale for v in variants], dtype=float)
        stds = np.array([((v.get(metric) or {}).get("std") or 0.0) / scale for v in variants], dtype=float)
        return means, stds

    fig, axes = plt.subplots(1, 4, figsize=(16, 4))
    m16, s16 = series("cv_log_loss_16bit")
    mq, sq = series("cv_log_loss_quantized")
    axes[0].bar(x - 0.2, m16, 0.4, yerr=s16, label="own 16-bit reference", color="#4C72B0")
    axes[0].bar(x + 0.2, mq, 0.4, yerr=sq, label="quantized (shipped)", color="#DD8452")
    priors = [run["prior_log_loss"] for run in report["runs"]]
    axes[0].axhline(float(np.mean(priors)), color="grey", linestyle="--", label="class prior")
    low = np.nanmin(np.concatenate([m16 - s16, mq - sq, [np.mean(priors)]]))
    high = np.nanmax(np.concatenate([m16 + s16, mq + sq, [np.mean(priors)]]))
    axes[0].set_ylim(low - 0.05 * (high - low + 1e-3), high + 0.05 * (high - low + 1e-3))
    axes[0].set_title("CV log loss (lower is better)")
    axes[0].legend(fontsize=8)
    has_common = any(v.get("qid_vs_common") for v in variants)
    qid_metric, qid_title = (
        ("qid_vs_common", "QiD vs common 16-bit reference")
        if has_common
        else ("gap_vs_own_reference", "shipped - own 16-bit reference")
    )
    for axis, metric, title, scale in (
        (axes[1], qid_metric, qid_title, 1.0),
        (axes[2], "train_wall_time_s", "training wall time (s)", 1.0),
        (axes[3], "artifact_bytes", "artifact size (MB)", 1e6),
    ):
        means, stds = series(metric, scale)
        axis.bar(x, means, 0.6, yerr=stds, color="#55A868")
        axis.set_title(title)
        axis.axhline(0, color="black", linewidth=0.5)
    for axis in axes:
        axis.set_xticks(x)
        axis.set_xticklabels(names, rotation=15, fontsize=8)
    fig.suptitle(f"{report['decision']['statement']}\n{report['environment']['device']}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_learning_curves(report: ComparisonReport | dict, path: str | Path) -> Path:
    """Held-out log loss at each evaluation step, one line per run and fold, against the class prior: shows
    whether a run was still improving when it stopped, or over-fitting. One run: titled with its variant."""
    report = _serialised(report)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = report["runs"]
    single = len(runs) == 1
    fig, axis = plt.subplots(figsize=(7, 4))
    for run in runs:
        for fold in run["per_fold"]:
            steps = [point["step"] for point in fold["history"]]
            losses = [point["eval_loss"] for point in fold["history"]]
            label = (
                f"fold {fold['fold']}"
                if single
                else f"{run['variant']} seed {run['seed']} fold {fold['fold']}"
            )
            axis.plot(steps, losses, marker="o", label=label)
    axis.axhline(runs[0]["prior_log_loss"], color="grey", linestyle="--", label="class prior")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("held-out log loss")
    if single:
        axis.set_title(f"{runs[0]['variant']}: evaluation during training")
        axis.legend()
    else:
        axis.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def artifact_table(report: ComparisonReport | dict) -> pl.DataFrame:
    """The shipped artifacts, one row per trained fold: fold, held-out log loss of the artifact, its folder."""
    report = _serialised(report)
    return pl.DataFrame(
        [
            {
                "fold": fold["fold"],
                "log_loss_quantized": fold["log_loss_quantized"],
                "artifact_dir": fold["artifact_dir"],
            }
            for run in report["runs"]
            for fold in run["per_fold"]
        ]
    )


# ------------------------------------------------------------------------------------------------ typed report


@dataclass
class FoldRecord:
    """One fold of one run (`report.json` runs[i].per_fold[j])."""

    fold: int
    log_loss_16bit: float
    log_loss_quantized: float
    artifact_dir: str | None
    best_step: int | None = None
    log_loss_common_reference: float | None = None
    qid_vs_common: float | None = None
    metric_quantized: float | None = None
    history: list[dict] = field(default_factory=list)
    class_prior: list[float] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    other: dict[str, Any] = field(default_factory=dict, repr=False)  # keys this version does not name

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> FoldRecord:
        return _from_dict(cls, data)

    def to_dict(self) -> dict[str, Any]:
        return _to_dict(self)


@dataclass
class RunRecord:
    """One (variant, seed): CV over its folds' OOF rows and the folds (`report.json` runs[i])."""

    variant: str
    ordering: str
    seed: int
    rows: int
    cv_log_loss_16bit: float
    cv_log_loss_quantized: float
    folds: list[FoldRecord]
    prior_log_loss: float | None = None
    qid_vs_common: float | None = None
    cv_log_loss_common_reference: float | None = None
    gap_vs_own_reference: float | None = None
    other: dict[str, Any] = field(default_factory=dict, repr=False)
    # not in report.json: the paired noise estimate's per-row losses and the ship decision's rows
    row_losses_quantized: np.ndarray | None = field(default=None, repr=False)
    shipped: ShippedRun | None = field(default=None, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRecord:
        data = dict(data)
        folds = [FoldRecord.from_dict(f) for f in data.pop("per_fold", [])]
        record = _from_dict(cls, {k: v for k, v in data.items() if not k.startswith("_")}, folds=folds)
        record.row_losses_quantized = data.get("_row_losses_quantized")
        record.shipped = data.get("_shipped")
        return record

    def to_dict(self) -> dict[str, Any]:
        data = _to_dict(self, skip=("folds", "row_losses_quantized", "shipped"))
        return {**data, "per_fold": [f.to_dict() for f in self.folds]}


@dataclass
class ComparisonReport:
    """The whole comparison (`report.json`): decision, common reference, variant summaries, runs, setup,
    environment, definitions, and the ship decision."""

    decision: dict[str, Any]
    runs: list[RunRecord]
    variants: list[dict[str, Any]]
    setup: dict[str, Any]
    common_reference: dict[str, Any] = field(default_factory=dict)
    ship: dict[str, Any] | None = None
    skipped_variants: dict[str, str] = field(default_factory=dict)
    other: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComparisonReport:
        data = dict(data)
        runs = [RunRecord.from_dict(run) for run in data.pop("runs", [])]
        return _from_dict(cls, data, runs=runs)

    def to_dict(self) -> dict[str, Any]:
        data = _to_dict(self, skip=("runs",))
        data["runs"] = [run.to_dict() for run in self.runs]
        return _ordered(data)

    def run(self, variant: str, seed: int | None = None) -> RunRecord:
        """The run of `variant` (and `seed`; None: the first seed run)."""
        for run in self.runs:
            if run.variant == variant and (seed is None or run.seed == seed):
                return run
        raise UsageError(
            f"no run of variant {variant!r}"
            + (f" seed {seed}" if seed is not None else "")
            + f" in this report (runs: {[(r.variant, r.seed) for r in self.runs]})"
        )

    @property
    def winner(self) -> str:
        return str(self.decision["winner"])

    @property
    def statement(self) -> str:
        return str(self.decision["statement"])

    @property
    def shipped_artifact(self) -> str | None:
        """What `predict --artifact` takes: the ship decision's choice (an artifact or an ensemble folder)."""
        return None if not self.ship else str(self.ship["artifact"])

    def summary(self, variant: str) -> dict[str, Any]:
        """A variant's summary: metric -> {"mean", "std"} over seeds (None where not measured)."""
        for summary in self.variants:
            if summary["variant"] == variant:
                return summary
        raise UsageError(f"no variant {variant!r} in this report")


# The order of report.json's top-level keys (as written before the typed report existed).
_TOP_LEVEL_ORDER = (
    "question",
    "dialect",
    "decision",
    "common_reference",
    "variants",
    "runs",
    "setup",
    "environment",
    "total_time_s",
    "definitions",
    "skipped_variants",
    "ship",
)


def _ordered(data: dict[str, Any]) -> dict[str, Any]:
    ordered = {key: data[key] for key in _TOP_LEVEL_ORDER if key in data}
    return {**ordered, **{k: v for k, v in data.items() if k not in ordered}}


def _from_dict(cls, data: dict[str, Any], **given: Any):
    """A record from its JSON form: named keys become fields, others are kept in `other`; optional fields the
    JSON lacked are remembered, so `to_dict` writes back exactly what was read."""
    names = {f.name for f in dataclasses.fields(cls)}
    known = {k: v for k, v in data.items() if k in names and k != "other"}
    other = {k: v for k, v in data.items() if k not in names}
    try:
        record = cls(**known, **given, other=other)
    except TypeError as error:
        raise UsageError(f"not a comparison report record ({cls.__name__}): {error}") from error
    record._absent = tuple(name for name in names - set(data) - set(given) if name != "other")
    return record


def _to_dict(record: Any, skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The record's fields (less those its JSON lacked) and the keys it carried unnamed."""
    absent = set(getattr(record, "_absent", ()))
    data = {
        f.name: getattr(record, f.name)
        for f in dataclasses.fields(record)
        if f.name not in skip and f.name != "other" and f.name not in absent
    }
    return {**data, **record.other}
