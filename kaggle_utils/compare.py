"""Which ordering wins: fine-tune -> quantize or quantize -> fine-tune, trained on identical folds, base and seed.

`compare_orderings(cfg, train_path, out_dir)` trains every requested variant on the same folds (made once, or
read from `folds_path`), from the same base weights (a random-weight base is written once and loaded by all),
with the same seed(s) and data order, and writes `report.json`, `report.md` and `report.png` under `out_dir`,
plus the OOF probabilities (`oof.parquet`, metrics' layout) and one inference artifact per variant/seed/fold.

Per variant and fold it measures: log loss / accuracy on the held-out fold of the shipped quantized artifact
(reloaded from disk and scored by `inference.score_rows`, the encoding, batch schedule and view combination
`predict` uses, under `cfg.inference`: swap TTA when `cfg.inference.tta_swap`) and of the
variant's own 16-bit reference, training wall time, peak memory (CPU RSS; CUDA max allocated), trainable
parameters, artifact size on disk and inference rows/s. The held-out fold is only scored after training, by
the weights `cfg.train.selection` shipped (training.py): checkpoints are never chosen on it.

Two differences to a 16-bit model, under names that say what they are:

- `qid_vs_common` = shipped - the common reference, the same model for every variant of a seed: the 16-bit
  LoRA model of fine-tune -> quantize merged in fp32 (`merge_lora_fp32`), taken from the run of a variant with
  `common_reference=True` (ft-then-quant, ft-then-quant-int8/-nf4). It is not trained separately: without such
  a variant in the comparison (or, for `combine_reports`, in one of the joined reports) it is None.
- `gap_vs_own_reference` = shipped - the variant's own reference (`own_reference` in the report). For
  ft-then-quant that is its merged 16-bit model, and the gap is the quantization-induced degradation. For
  quant-then-ft (QLoRA, ApiQ, LoftQ, QA-*) it is the adapter trained on the quantized base applied to the 16-bit
  base, a mismatch that is usually worse than the shipped model: not a QiD, and not comparable across orderings.

Extension point: the variant registry
-------------------------------------
`VARIANTS` maps a name to a `Variant`; `compare_orderings(..., variants=[...])` runs any registered names.
A variant says which ordering it belongs to and supplies two functions:

- ``builder(ctx: FoldContext) -> BuildModel``: the `build_model(cfg, tokenizer, device)` that
  `training.train_fold` calls to make the trainable model for this fold (ctx gives the fold's training rows,
  e.g. for calibration data, and the shared 16-bit base directory);
- ``export(ctx: ExportContext) -> Exported``: from the trained model, write the shipped artifact under
  ``ctx.artifact_dir`` (usually with `artifacts.save_artifact`) and return the 16-bit reference model, and
  optionally the shipped model itself (when it cannot be reloaded through `artifacts.load_artifact`) and
  extra models to score (e.g. a merged copy).

Optional ``configure(cfg) -> cfg`` adjusts the config for the variant (e.g. ``quant.scheme = "int8"``).
The registry and the two orderings' variants live in `variant_registry.py`; register with
`register_variant(Variant(...))` from any module. This module imports `kaggle_utils.qaware.variants` at its top,
so the quantization-aware variants are registered whenever `compare` is imported.
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import math
import platform
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from kaggle_utils import __version__
from kaggle_utils.artifacts import artifact_size_bytes, load_artifact, update_manifest
from kaggle_utils.config import PipelineConfig
from kaggle_utils.data import load_competition
from kaggle_utils.devices import default_device
from kaggle_utils.dialects import Dialect, get_dialect
from kaggle_utils.errors import UsageError
from kaggle_utils.folds import folds_file_hash, load_folds, make_folds, save_folds
from kaggle_utils.formatting import TEMPLATE_VERSION
from kaggle_utils.inference import ScoredRows, score_rows
from kaggle_utils.metrics import class_prior, log_loss, make_oof, row_log_losses, save_oof
from kaggle_utils.modeling import base_has_weights, materialize_base
from kaggle_utils.qaware import variants as _qaware_variants  # noqa: F401  registers the quantization-aware ones
from kaggle_utils.real_models import base_weights_note, has_real_weights, resolve_tokenizer
from kaggle_utils.runtime import find_competition_file, run_output_dir
from kaggle_utils.ship import ShippedRun, ship_runs
from kaggle_utils.tokenizer import load_tokenizer
from kaggle_utils.training import PeakMemory, distributed_state, split_fold, train_fold
from kaggle_utils.variant_registry import (
    ORDERINGS,
    VARIANTS,
    ExportContext,
    Exported,
    FoldContext,
    Variant,
    merge_lora_fp32,
    register_variant,
)

logger = logging.getLogger(__name__)
# The registry's API is re-exported here: `compare` runs what the registry holds.
__all__ = [
    "ORDERINGS", "VARIANTS", "ExportContext", "Exported", "FoldContext", "Variant", "merge_lora_fp32",
    "register_variant", "resolve_variants", "compare_orderings", "demo_config", "resolve_training_notebook",
    "attach_common_reference", "summarise_variant", "decide_winner", "render_markdown", "plot_report",
    "plot_learning_curves", "artifact_table", "own_reference_description",
]

DEFAULT_VARIANTS: tuple[str, ...] = ORDERINGS
REPORT_JSON, REPORT_MD, REPORT_PNG, OOF_FILE = "report.json", "report.md", "report.png", "oof.parquet"
# Demo scale (tiny Gemma-2, max length 128, one held-out fold, 2 epochs): learns the generated data's signal
# well below the class prior; about 1.5 minutes for both orderings on ~2,000 generated rows, 1 CPU thread.
DEMO_CONFIG = Path(__file__).resolve().parent / "resources" / "compare_demo.yaml"
# A winner is declared only when the paired per-row difference exceeds this many standard errors.
NOISE_Z = 2.0


# ------------------------------------------------------------------------------------------------ registry


def resolve_variants(names: Sequence[str] | None) -> list[Variant]:
    names = list(names or DEFAULT_VARIANTS)
    unknown = [name for name in names if name not in VARIANTS]
    if unknown:
        raise UsageError(f"unknown variant(s) {unknown}; registered: {sorted(VARIANTS)}")
    if len(set(names)) != len(names):
        raise UsageError(f"variants listed twice: {names}")
    return [VARIANTS[name] for name in names]



# ------------------------------------------------------------------------------------------------ the run


def demo_config() -> PipelineConfig:
    """The demo-scale settings (`DEMO_CONFIG`), e.g. for `compare_orderings(demo_config(), train_csv, out)`."""
    return PipelineConfig.from_yaml(DEMO_CONFIG)


def resolve_training_notebook(
    ordering: str,
    competition: str,
    *,
    train_path: str | Path | None = None,
    out_dir: str | Path | None = None,
    config_path: str | Path | None = None,
    base_model_path: str | None = None,
    tokenizer_path: str | None = None,
    cv_folds: Sequence[int] = (0,),
    overrides: dict[str, dict[str, Any]] | None = None,
) -> tuple[PipelineConfig, Path, Path]:
    """(cfg, train_path, out_dir) from a training notebook's parameters, the same on Kaggle and locally.

    The config is the YAML at `config_path` (else the defaults) with `overrides` applied section-wise; a given
    base model / tokenizer path replaces the config's. `train_path` None: the competition's train.csv under
    /kaggle/input (either mount layout), else data/train.csv. `out_dir` None: /kaggle/working/<ordering> on
    Kaggle, else runs/<ordering>. An `ordering` that is not one of ORDERINGS stops here, before any work.
    """
    if ordering not in ORDERINGS:
        raise UsageError(f"ORDERING {ordering!r} is not one of {list(ORDERINGS)}")
    cfg = PipelineConfig.from_yaml(config_path) if config_path else PipelineConfig()
    cfg = cfg.with_overrides(overrides)
    cfg.model.base_model = base_model_path or cfg.model.base_model
    cfg.format.tokenizer_path = tokenizer_path or cfg.format.tokenizer_path
    cfg.train.cv_folds = tuple(cv_folds)
    if train_path:
        train = Path(train_path)
    else:
        try:
            train = find_competition_file(competition, get_dialect(cfg.data.format).train_file)
        except UsageError as error:
            raise UsageError(f"{error}; set TRAIN_PATH") from None
    return cfg, train, run_output_dir(ordering, out_dir)


def compare_orderings(
    cfg: PipelineConfig,
    train_path: str | Path,
    out_dir: str | Path,
    folds_path: str | Path | None = None,
    seeds: Sequence[int] = (42,),
    variants: Sequence[str] | None = None,
    progress: bool = True,
    baseline: tuple[pl.DataFrame, str | Path] | None = None,
) -> dict:
    """Train each variant (default: both orderings) on the same folds/base/seed(s); write and return the report.

    Folds trained: `cfg.train.cv_folds` (None: every fold of the folds file). With several seeds the report
    gives mean ± std over seeds. Then the ship decision (`ship.py`): every variant's shipped model (first seed),
    the class prior, `baseline` when given (its OOF table on the same folds file, and its model file), their
    calibrated versions and the blend, ranked by cross-fitted CV on the same rows; the best is written as
    `shipped/` (or is a variant's own artifact) and named in the report's `ship` section.
    """
    requested = resolve_variants(variants)
    skipped = {v.name: reason for v in requested if v.unavailable and (reason := v.unavailable())}
    for name, reason in skipped.items():
        logger.warning("skipping variant %s: %s", name, reason)
    chosen = [v for v in requested if v.name not in skipped]
    if not chosen:
        raise UsageError("no requested variant can run on this machine: "
                         + "; ".join(f"{name}: {why}" for name, why in skipped.items()))
    if not seeds:
        raise UsageError("compare_orderings needs at least one seed")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    frame = load_competition(train_path, cfg.data, split="train").frame
    # Under `accelerate launch` every process runs this; the main one alone writes the shared inputs (folds,
    # demo tokenizer, random-weight base) and the others read them once written.
    dist = distributed_state()
    with dist.main_process_first():
        if folds_path is None:
            folds_path = out_dir / "folds.parquet"
            if dist.is_main_process:
                save_folds(make_folds(frame, cfg.folds), folds_path)
        folds = load_folds(folds_path)
        folds_hash = folds_file_hash(folds_path)
        fold_ids = (sorted(folds["fold"].unique().to_list()) if cfg.train.cv_folds is None
                    else list(cfg.train.cv_folds))
        missing = sorted(set(fold_ids) - set(folds["fold"].unique().to_list()))
        if missing:
            raise UsageError(f"train.cv_folds {missing} are not in {folds_path}")
        tokenizer = _tokenizer(cfg, frame, out_dir, write=dist.is_main_process)
        device = default_device()
        if dist.is_main_process or base_has_weights(cfg.model.base_model):
            base_dir = materialize_base(cfg.model, out_dir / "base", vocab_size=len(tokenizer),
                                        pad_token_id=tokenizer.pad_token_id)
        else:
            base_dir = out_dir / "base"

    runs: list[dict] = []
    oof_tables: list[pl.DataFrame] = []
    for seed in seeds:
        for variant in chosen:
            run_cfg = _variant_config(cfg, variant, seed, base_dir)
            run_dir = out_dir / "runs" / f"seed{seed}" / variant.name
            folds_out = []
            for fold in fold_ids:
                fold_run, tables = _run_fold(run_cfg, variant, frame, folds, fold, seed, tokenizer, base_dir,
                                             device, run_dir / f"fold{fold}", folds_hash, progress)
                if fold_run is None:  # not the main process: it only took its share of the training
                    continue
                folds_out.append(fold_run)
                oof_tables += tables
            if folds_out:
                runs.append(_aggregate_run(variant, seed, folds_out, get_dialect(cfg.data.format)))
    if not dist.is_main_process:
        return {}

    # One write for the whole run: every fold of every name at once (names of other runs in the file are kept).
    save_oof(pl.concat(oof_tables, how="vertical"), out_dir / OOF_FILE, replace="name")
    report = _build_report(cfg, chosen, seeds, fold_ids, runs, frame, folds_path, folds_hash, device, began)
    report["skipped_variants"] = skipped
    report["ship"] = _ship(runs, seeds[0], folds, frame, out_dir, cfg.data.format, baseline)
    (out_dir / REPORT_JSON).write_text(json.dumps(report, indent=2), encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_markdown(report), encoding="utf-8")
    plot_report(report, out_dir / REPORT_PNG)
    return report


def _ship(runs: list[dict], seed: int, folds: pl.DataFrame, frame: pl.DataFrame, out_dir: Path, dialect: str,
          baseline: tuple[pl.DataFrame, str | Path] | None) -> dict:
    """The ship decision over the first seed's runs (and the baseline): `ship.ship_runs`."""
    groups_by_id = dict(zip(folds["id"].to_list(), folds["group"].to_list(), strict=True))
    prior = class_prior(frame["label"].to_numpy().astype(np.int64))
    baseline_rows = None
    if baseline is not None:
        table, model_path = baseline
        baseline_rows = ({row_id: np.array(p) for row_id, *p in
                          table.select("id", "p_a", "p_b", "p_tie").iter_rows()}, model_path)
    decision, shipped = ship_runs([run["_shipped"] for run in runs if run["seed"] == seed], groups_by_id, prior,
                                  out_dir, dialect, baseline_rows)
    return {**decision.to_dict(), "artifact": str(shipped), "reliability_png": "reliability.png"}


def _base_weights_note(base_model: str) -> str | None:
    return base_weights_note(base_model)


def _tokenizer(cfg: PipelineConfig, frame: pl.DataFrame, out_dir: Path, write: bool = True):
    """The run's tokenizer; with `write` False (a non-main process) the demo tokenizer the main process trained
    into out_dir/tokenizer is read back instead of being trained and written a second time."""
    if not write and not has_real_weights(cfg.model.base_model) and not cfg.format.tokenizer_path:
        return load_tokenizer(out_dir / "tokenizer")
    texts = (turn for column in ("prompt", "response_a", "response_b") for turns in frame[column] for turn in turns)
    return resolve_tokenizer(cfg, texts, out_dir / "tokenizer")  # a real checkpoint gets its own tokenizer


def _variant_config(cfg: PipelineConfig, variant: Variant, seed: int, base_dir: Path) -> PipelineConfig:
    run_cfg = copy.deepcopy(cfg)
    run_cfg.train.ordering = variant.ordering
    run_cfg.train.seed = seed
    run_cfg.model.base_model = str(base_dir)
    if variant.configure is not None:
        run_cfg = variant.configure(run_cfg)
    return run_cfg


def _run_fold(cfg, variant: Variant, frame, folds, fold: int, seed: int, tokenizer, base_dir: Path, device,
              run_dir: Path, folds_hash: str, progress: bool) -> tuple[dict | None, list[pl.DataFrame]]:
    train_part, val_part = split_fold(frame, folds, fold)
    fold_ctx = FoldContext(cfg=cfg, fold=fold, seed=seed, train_frame=train_part, tokenizer=tokenizer,
                           base_dir=base_dir, device=device)
    logger.info("variant %s, seed %d, fold %d: training", variant.name, seed, fold)
    with PeakMemory(device) as memory:
        result = train_fold(cfg, frame, folds, tokenizer, run_dir / "train", fold=fold,
                            build_model=variant.builder(fold_ctx), progress=progress)
    if not distributed_state().is_main_process:
        return None, []  # the artifact, its predictions and the report are the main process's
    prior = class_prior(train_part["label"].to_numpy().astype(np.int64))
    manifest_fields = {
        "ordering": variant.ordering,
        "variant": variant.name,
        "base_model": str(base_dir),
        "folds_file_hash": folds_hash,
        "cv_scores": {"fold": fold, "train_time_eval_log_loss": _finite(result.best_eval_loss)},
        "class_prior": prior.tolist(),
        "seed": seed,
        "dialect": cfg.data.format,  # predict() reads the test file and writes the submission in this dialect
    }
    exported = variant.export(ExportContext(fold_ctx, result, run_dir / "artifact", manifest_fields))
    labels = result.val_labels
    scoring = dataclasses.replace(cfg.inference, progress=progress)

    def score(model, model_tokenizer=tokenizer, format_config=cfg.format) -> ScoredRows:
        return score_rows(model, model_tokenizer, format_config, val_part, scoring, device)

    probs16 = score(exported.reference_model).probs
    if exported.shipped_model is not None:
        shipped, artifact_bytes = exported.shipped_model, _model_bytes(exported.shipped_model)
        scored = score(shipped)
    else:  # reloaded from disk and scored with the artifact's own tokenizer and format, as `predict` does
        loaded = load_artifact(exported.artifact_dir, device=device)
        shipped, artifact_bytes = loaded.model, artifact_size_bytes(exported.artifact_dir)
        scored = score(shipped, loaded.tokenizer, loaded.format_config)
    probs_q, rows_per_s = scored.probs, scored.rows_per_s
    loss16, loss_q = log_loss(labels, probs16), log_loss(labels, probs_q)
    extras = {}
    for name, model in exported.extra_models.items():
        probs_x = score(model).probs
        extras[name] = {"log_loss": log_loss(labels, probs_x), "qid_vs_16bit": log_loss(labels, probs_x) - loss16,
                        "max_abs_prob_diff_vs_shipped": float(np.abs(probs_x - probs_q).max())}
    scores = {"fold": fold, "log_loss_16bit": loss16, "log_loss_quantized": loss_q,
              "gap_vs_own_reference": loss_q - loss16, "train_time_eval_log_loss": _finite(result.best_eval_loss)}
    if exported.artifact_dir is not None:
        update_manifest(exported.artifact_dir, cv_scores=scores)
    name = f"{variant.name}/seed{seed}"
    folds_column = np.full(len(labels), fold)
    tables = [make_oof(f"{name}/16bit", result.val_ids, folds_column, probs16, labels),
              make_oof(f"{name}/quantized", result.val_ids, folds_column, probs_q, labels)]
    fold_run = {
        "fold": fold,
        "labels": labels,
        "probs_16bit": probs16,
        "probs_quantized": probs_q,
        "train": result.summary(),
        "peak_rss_bytes": memory.peak_rss_bytes,
        "peak_cuda_bytes": memory.peak_cuda_bytes,
        "rss_is_lifetime_peak": memory.rss_is_lifetime_peak,
        "artifact_dir": str(exported.artifact_dir) if exported.artifact_dir else None,
        "artifact_bytes": artifact_bytes,
        "inference_rows_per_s": rows_per_s,
        "extras": extras,
        "notes": fold_ctx.notes,
        "prior_log_loss": result.prior_log_loss,
        "class_prior": prior.tolist(),
        "ids": list(result.val_ids),
    }
    del result, exported, shipped
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fold_run, tables


def _model_bytes(model: nn.Module) -> int:
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)))


# ------------------------------------------------------------------------------------------------ numbers


def _aggregate_run(variant: Variant, seed: int, folds_out: list[dict], dialect: Dialect | None = None) -> dict:
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
        "peak_cuda_bytes": max((f["peak_cuda_bytes"] for f in folds_out if f["peak_cuda_bytes"]), default=None),
        "trainable_params": trains[0]["trainable_params"],
        "total_params": trains[0]["total_params"],
        "artifact_bytes": int(np.mean([f["artifact_bytes"] for f in folds_out])),
        "inference_rows_per_s": float(np.mean([f["inference_rows_per_s"] for f in folds_out])),
        "steps": trains[0]["total_steps"],
        "per_fold": [
            {"fold": f["fold"], "log_loss_16bit": log_loss(f["labels"], f["probs_16bit"]),
             "log_loss_quantized": log_loss(f["labels"], f["probs_quantized"]),
             "log_loss_common_reference": None, "qid_vs_common": None,
             "metric_quantized": dialect.metric(f["labels"], f["probs_quantized"]),
             "best_step": f["train"]["best_step"], "history": f["train"]["history"],
             "class_prior": f["class_prior"],
             "artifact_dir": f["artifact_dir"], "extras": f["extras"], "notes": f["notes"]}
            for f in folds_out
        ],
        # per-row losses (not written to JSON) for the paired noise estimate, and the rows for the ship decision
        "_row_losses_quantized": row_log_losses(labels, pq),
        "_shipped": ShippedRun(
            name=variant.name, ids=[i for f in folds_out for i in f["ids"]], labels=labels, probs=pq,
            row_priors=np.concatenate([np.tile(f["class_prior"], (len(f["labels"]), 1)) for f in folds_out]),
            artifact_dirs=[f["artifact_dir"] for f in folds_out]),
    }


def own_reference_description(variant: Variant) -> str:
    """What a variant's own "16-bit" reference model is (the one `gap_vs_own_reference` subtracts)."""
    if variant.ordering == "ft-then-quant":
        return "its LoRA merged into the 16-bit base (merged in fp32), before quantizing"
    return ("its adapter, trained on the quantized base, applied to the 16-bit base (a mismatch: not a "
            "quantization cost)")


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)


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
        reference = next((run for run in runs if run["seed"] == seed and run.get("provides_common_reference")),
                         None)
        if reference is None:
            continue
        source = source or reference["variant"]
        by_fold = {f["fold"]: f["log_loss_16bit"] for f in reference["per_fold"]}
        for run in (r for r in runs if r["seed"] == seed):
            if run["rows"] != reference["rows"]:
                raise UsageError(f"{run['variant']} seed {seed} has {run['rows']} OOF rows, the common reference "
                                 f"{reference['rows']}: they were not scored on the same rows")
            run["cv_log_loss_common_reference"] = reference["cv_log_loss_16bit"]
            run["qid_vs_common"] = run["cv_log_loss_quantized"] - reference["cv_log_loss_16bit"]
            for fold in run["per_fold"]:
                if fold["fold"] in by_fold:
                    fold["log_loss_common_reference"] = by_fold[fold["fold"]]
                    fold["qid_vs_common"] = fold["log_loss_quantized"] - by_fold[fold["fold"]]
    if source is None:
        return {"variant": None, "note": "no common reference: run ft-then-quant (or ft-then-quant-int8/-nf4) "
                                         "in the same comparison to get qid_vs_common"}
    return {"variant": source, "note": f"the 16-bit LoRA model of {source} (fine-tune -> quantize), merged in "
                                       "fp32, on the same folds and seed"}


SUMMARY_METRICS: tuple[str, ...] = (
    "cv_log_loss_16bit", "cv_log_loss_quantized", "cv_log_loss_common_reference", "qid_vs_common",
    "gap_vs_own_reference", "accuracy_16bit", "accuracy_quantized", "cv_metric_16bit", "cv_metric_quantized",
    "train_time_eval_log_loss", "train_wall_time_s", "train_tokens_per_s", "peak_rss_bytes", "peak_cuda_bytes",
    "trainable_params", "artifact_bytes", "inference_rows_per_s",
)


def _summarise(runs: list[dict], variant: Variant) -> dict:
    return summarise_variant(runs, variant.name, variant.ordering, variant.description)


def summarise_variant(runs: list[dict], name: str, ordering: str, description: str) -> dict:
    """Mean (and std over seeds) of every SUMMARY_METRICS value of one variant's runs."""
    mine = [run for run in runs if run["variant"] == name]
    summary: dict[str, Any] = {"variant": name, "ordering": ordering, "description": description,
                               "seeds": [run["seed"] for run in mine],
                               "own_reference": mine[0].get("own_reference") if mine else None}
    for metric in SUMMARY_METRICS:
        values = [run[metric] for run in mine if run.get(metric) is not None]
        if not values:
            summary[metric] = None
            continue
        summary[metric] = {"mean": float(np.mean(values)),
                           "std": float(np.std(values, ddof=1)) if len(values) > 1 else None}
    return summary


def decide_winner(runs: list[dict], names: list[str]) -> dict:
    """The variant with the lowest mean quantized CV log loss (what ships), and whether its lead is noise.

    Noise: the paired per-row loss difference to the runner-up on the same OOF rows, per seed; the lead counts
    when its mean exceeds NOISE_Z standard errors (rows) and, with several seeds, NOISE_Z standard errors of the
    per-seed differences as well.
    """
    means = {name: float(np.mean([r["cv_log_loss_quantized"] for r in runs if r["variant"] == name]))
             for name in names}
    ranked = sorted(means, key=means.get)
    if len(ranked) < 2:
        return {"winner": ranked[0], "runner_up": None, "difference": None, "within_noise": None,
                "statement": f"only {ranked[0]} was run: nothing to compare"}
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
        + (": the difference is within noise, so neither ordering wins on this data." if within
           else f": {best} wins.")
    )
    return {"winner": best, "runner_up": second, "difference": difference, "standard_error": noise,
            "standard_error_rows": se_rows, "standard_error_seeds": se_seeds, "within_noise": bool(within),
            "statement": statement}


def _build_report(cfg, chosen, seeds, fold_ids, runs, frame, folds_path, folds_hash, device, began) -> dict:
    import transformers

    names = [variant.name for variant in chosen]
    decision = decide_winner(runs, names)
    common = attach_common_reference(runs)
    try:
        import bitsandbytes
        import peft
        versions = {"bitsandbytes": bitsandbytes.__version__, "peft": peft.__version__}
    except ImportError:
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
                                        + ("the inner holdout of the training part" if cfg.train.selection == "inner"
                                           else "a sample of the held-out fold, used for the learning curve only")
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
    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads), no GPU"


# ------------------------------------------------------------------------------------------------ outputs


def _fmt(stat: dict | None, digits: int = 4, scale: float = 1.0, unit: str = "") -> str:
    if stat is None:
        return "n/a"
    mean = stat["mean"] / scale
    text = f"{mean:.{digits}f}"
    if stat.get("std"):  # None (one seed) or 0 (a count that cannot vary) shows no spread
        text += f" ± {stat['std'] / scale:.{digits}f}"
    return text + unit


def render_markdown(report: dict) -> str:
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
            extras = "; ".join(f"{k}: log loss {x['log_loss']:.4f}, largest probability change vs shipped "
                               f"{x['max_abs_prob_diff_vs_shipped']:.4f}" for k, x in fold["extras"].items())
            common = fold.get("qid_vs_common")
            lines.append(f"| {run['variant']} | {run['seed']} | {fold['fold']} | {fold['log_loss_16bit']:.4f} "
                         f"| {fold['log_loss_quantized']:.4f} | {'n/a' if common is None else f'{common:+.4f}'} "
                         f"| {fold['best_step']} | {extras or '-'} |")
    lines += ["", f"Versions: torch {env['torch']}, transformers {env['transformers']}, "
                  f"peft {env.get('peft', '?')}, bitsandbytes {env.get('bitsandbytes', '?')}; {env['date']}.", ""]
    return "\n".join(lines)


def _ship_lines(report: dict) -> list[str]:
    ship = report.get("ship")
    if not ship:
        return ["No ship decision in this report.", ""]
    lines = ["Every candidate on the same OOF rows; calibrations and blend weights scored cross-fitted (fitted on "
             "the other prompt-group splits of the OOF rows), so no figure is the in-sample one its fit optimised.",
             "", "| rank | candidate | kind | CV log loss | note |", "|---|---|---|---|---|"]
    for rank, candidate in enumerate(ship["ranking"], 1):
        lines.append(f"| {rank} | {candidate['name']} | {candidate['kind']} | {candidate['cv_log_loss']:.4f} "
                     f"| {candidate['note']} |")
    return [*lines, "", f"**{ship['statement']}**; shipped: `{ship['artifact']}`.", "",
            f"![reliability]({ship.get('reliability_png', 'reliability.png')})", ""]


def _metric_lines(report: dict) -> list[str]:
    """The competition metric per variant, when the dialect's metric is not log loss itself (WSDM: accuracy)."""
    dialect = report.get("dialect") or {}
    if not dialect or dialect.get("metric") == "log_loss":
        return []
    better = "higher" if dialect.get("higher_is_better") else "lower"
    lines = ["", f"Competition metric ({dialect['name']}): {dialect['metric']}, {better} is better "
                 "(the winner above is chosen by log loss).", "",
             f"| variant | {dialect['metric']} shipped | {dialect['metric']} own 16-bit reference | secondary (shipped) |",
             "|---|---|---|---|"]
    for v in report["variants"]:
        secondary = {}
        for run in report["runs"]:
            if run["variant"] == v["variant"]:
                for name, value in (run.get("cv_secondary_quantized") or {}).items():
                    secondary.setdefault(name, []).append(value)
        text = ", ".join(f"{name} {np.mean(values):.4f}" for name, values in secondary.items()) or "-"
        lines.append(f"| {v['variant']} | {_fmt(v.get('cv_metric_quantized'))} | {_fmt(v.get('cv_metric_16bit'))} "
                     f"| {text} |")
    return lines


def plot_report(report: dict, path: str | Path) -> Path:
    """Bar chart: CV log loss (16-bit vs quantized, ± std over seeds), QiD, training time, artifact size."""
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
    qid_metric, qid_title = (("qid_vs_common", "QiD vs common 16-bit reference") if has_common
                             else ("gap_vs_own_reference", "shipped - own 16-bit reference"))
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


def plot_learning_curves(report: dict, path: str | Path) -> Path:
    """Held-out log loss at each evaluation step, one line per run and fold, against the class prior: shows
    whether a run was still improving when it stopped, or over-fitting. One run: titled with its variant."""
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
            label = f"fold {fold['fold']}" if single else f"{run['variant']} seed {run['seed']} fold {fold['fold']}"
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


def artifact_table(report: dict) -> pl.DataFrame:
    """The shipped artifacts, one row per trained fold: fold, held-out log loss of the artifact, its folder."""
    return pl.DataFrame(
        [
            {"fold": fold["fold"], "log_loss_quantized": fold["log_loss_quantized"],
             "artifact_dir": fold["artifact_dir"]}
            for run in report["runs"]
            for fold in run["per_fold"]
        ]
    )


def _template_version() -> str:
    """The prompt template / truncation version the runs encoded with (their artifacts refuse any other)."""
    return TEMPLATE_VERSION
