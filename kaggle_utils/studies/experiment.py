"""One experiment: the setup a run's variants share, and its unit of work (one variant on one fold).

Used by `train`, `compare-orderings`, `qid-study` and the demo:

    experiment = prepare_experiment(cfg, train_path, out_dir)  # frame, folds, tokenizer, 16-bit base, once
    run_cfg = variant_config(cfg, variant, seed, experiment.base_dir)
    record, oof_tables = run_fold(experiment, run_cfg, variant, fold, seed, run_dir)

`cv_report.aggregate_run` turns the fold records into a run.
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from torch import nn

from kaggle_utils.core.config import PipelineConfig, save_resolved
from kaggle_utils.core.environment import find_competition_file, run_output_dir
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import class_prior, exclusion_record, log_loss, make_oof
from kaggle_utils.data.dialect_base import Dialect
from kaggle_utils.data.dialects import get_dialect
from kaggle_utils.data.folds import drop_folds, folds_file_hash, load_folds, make_folds, save_folds
from kaggle_utils.data.load import load_competition
from kaggle_utils.inference.scoring import ScoredRows, score_rows
from kaggle_utils.models.classifier import base_has_weights, materialize_base
from kaggle_utils.models.devices import default_device
from kaggle_utils.models.real import has_real_weights, resolve_tokenizer
from kaggle_utils.quant.artifacts import artifact_size_bytes, load_artifact
from kaggle_utils.quant.manifest import update_manifest
from kaggle_utils.text.tokenizer import load_tokenizer
from kaggle_utils.train.fold_data import split_fold
from kaggle_utils.train.loop import train_fold
from kaggle_utils.train.model_setup import distributed_state
from kaggle_utils.train.results import PeakMemory
from kaggle_utils.variants.registry import ORDERINGS, ExportContext, FoldContext, Variant

logger = logging.getLogger(__name__)

# Demo scale: tiny Gemma-2, max length 128, one held-out fold, 2 epochs.
DEMO_CONFIG = Path(__file__).resolve().parents[1] / "resources" / "compare_demo.yaml"


@dataclass
class Experiment:
    """What every variant, seed and fold of one run shares; made by `prepare_experiment`."""

    frame: pl.DataFrame
    folds: pl.DataFrame
    folds_path: Path
    folds_hash: str
    fold_ids: list[int]
    tokenizer: Any
    base_dir: Path
    device: torch.device
    dialect: Dialect
    out_dir: Path
    # What the run left out (train.exclude_folds), for its OOF file (metrics.save_oof's record): a teacher
    # made by this run is accepted for a student held out on one of those folds (train/teacher.py).
    oof_record: dict | None = None


def prepare_experiment(
    cfg: PipelineConfig,
    train_path: str | Path,
    out_dir: str | Path,
    folds_path: str | Path | None = None,
    fold_ids: Sequence[int] | None = None,
) -> Experiment:
    """Load the frame, make (or read `folds_path`) the folds, make the tokenizer and the 16-bit base, once.

    `fold_ids`: the folds to train (None: `cfg.train.cv_folds`, and None there: every fold of the folds file);
    a fold the file lacks is a UsageError. Under `accelerate launch` the main process writes, the others read.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_resolved(cfg, out_dir)  # the config this run used, every value, beside its outputs
    frame = load_competition(train_path, cfg.data, split="train").frame
    dist = distributed_state()
    with dist.main_process_first():
        if folds_path is None:
            folds_path = out_dir / "folds.parquet"
            if dist.is_main_process:
                save_folds(make_folds(frame, cfg.folds), folds_path)
        folds_path = Path(folds_path)
        folds = load_folds(folds_path)
        folds_hash = folds_file_hash(folds_path)
        oof_record = exclusion_record(folds, cfg.train.exclude_folds, folds_hash)
        frame, folds = drop_folds(
            frame, folds, cfg.train.exclude_folds, f"{folds_path} (train.exclude_folds)"
        )
        present = sorted(folds["fold"].unique().to_list())
        chosen = fold_ids if fold_ids is not None else cfg.train.cv_folds
        chosen = present if chosen is None else [int(fold) for fold in chosen]
        missing = sorted(set(chosen) - set(present))
        if missing:
            excluded = f", {sorted(cfg.train.exclude_folds)} excluded" if cfg.train.exclude_folds else ""
            raise UsageError(f"folds {missing} are not in {folds_path} (it has {present}{excluded})")
        tokenizer = _tokenizer(cfg, frame, out_dir, write=dist.is_main_process)
        if dist.is_main_process or base_has_weights(cfg.model.base_model):
            base_dir = materialize_base(
                cfg.model, out_dir / "base", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
            )
        else:
            base_dir = out_dir / "base"
    return Experiment(
        frame=frame,
        folds=folds,
        folds_path=folds_path,
        folds_hash=folds_hash,
        fold_ids=chosen,
        tokenizer=tokenizer,
        base_dir=Path(base_dir),
        device=default_device(),
        dialect=get_dialect(cfg.data.format),
        out_dir=out_dir,
        oof_record=oof_record,
    )


def demo_config() -> PipelineConfig:
    """The demo-scale settings (`DEMO_CONFIG`), e.g. `compare_orderings(demo_config(), train_csv, out)`."""
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
    cfg = cfg.with_overrides(
        {
            "model": {"base_model": base_model_path or cfg.model.base_model},
            "format": {"tokenizer_path": tokenizer_path or cfg.format.tokenizer_path},
            "train": {"cv_folds": list(cv_folds)},
        }
    )
    if train_path:
        train = Path(train_path)
    else:
        try:
            train = find_competition_file(competition, get_dialect(cfg.data.format).train_file)
        except UsageError as error:
            raise UsageError(f"{error}; set TRAIN_PATH") from None
    return cfg, train, run_output_dir(ordering, out_dir)


def _tokenizer(cfg: PipelineConfig, frame: pl.DataFrame, out_dir: Path, write: bool = True):
    """The run's tokenizer; with `write` False (a non-main process) the demo tokenizer the main process
    trained into out_dir/tokenizer is read back instead of being trained and written a second time."""
    if not write and not has_real_weights(cfg.model.base_model) and not cfg.format.tokenizer_path:
        return load_tokenizer(out_dir / "tokenizer")
    texts = (
        turn for column in ("prompt", "response_a", "response_b") for turns in frame[column] for turn in turns
    )
    return resolve_tokenizer(cfg, texts, out_dir / "tokenizer")  # a real checkpoint gets its own tokenizer


def variant_config(cfg: PipelineConfig, variant: Variant, seed: int, base_dir: Path) -> PipelineConfig:
    """The variant's copy of `cfg` (validated like any config): its ordering and seed, the shared base, and
    the variant's own `configure` (e.g. its quantization scheme). The caller's config is left as it was."""
    run_cfg = cfg.with_overrides(
        {"train": {"ordering": variant.ordering, "seed": seed}, "model": {"base_model": str(base_dir)}}
    )
    if variant.configure is not None:
        run_cfg = variant.configure(run_cfg)
    return run_cfg


def run_fold(
    experiment: Experiment,
    cfg: PipelineConfig,
    variant: Variant,
    fold: int,
    seed: int,
    run_dir: Path,
    progress: bool = True,
) -> tuple[dict | None, list[pl.DataFrame]]:
    """Train `variant` on every fold but `fold`, export its artifact and score the held-out fold with it.

    `cfg` is the variant's (`variant_config`). Returns the fold's record and its OOF tables; (None, []) on a
    non-main process of `accelerate launch`, which only trains its share.
    """
    frame, folds, tokenizer = experiment.frame, experiment.folds, experiment.tokenizer
    base_dir, device, folds_hash = experiment.base_dir, experiment.device, experiment.folds_hash
    train_part, val_part = split_fold(frame, folds, fold)
    fold_ctx = FoldContext(
        cfg=cfg,
        fold=fold,
        seed=seed,
        train_frame=train_part,
        tokenizer=tokenizer,
        base_dir=base_dir,
        device=device,
    )
    logger.info("variant %s, seed %d, fold %d: training", variant.name, seed, fold)
    with PeakMemory(device) as memory:
        result = train_fold(
            cfg,
            frame,
            folds,
            tokenizer,
            run_dir / "train",
            fold=fold,
            build_model=variant.builder(fold_ctx),
            progress=progress,
        )
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
    views_q = scored.views.probs  # (views, rows, 3): the ship decision chooses the TTA space on them
    loss16, loss_q = log_loss(labels, probs16), log_loss(labels, probs_q)
    extras = {}
    for name, model in exported.extra_models.items():
        probs_x = score(model).probs
        extras[name] = {
            "log_loss": log_loss(labels, probs_x),
            "qid_vs_16bit": log_loss(labels, probs_x) - loss16,
            "max_abs_prob_diff_vs_shipped": float(np.abs(probs_x - probs_q).max()),
        }
    scores = {
        "fold": fold,
        "log_loss_16bit": loss16,
        "log_loss_quantized": loss_q,
        "gap_vs_own_reference": loss_q - loss16,
        "train_time_eval_log_loss": _finite(result.best_eval_loss),
    }
    if exported.artifact_dir is not None:
        update_manifest(exported.artifact_dir, cv_scores=scores)
    name = f"{variant.name}/seed{seed}"
    folds_column = np.full(len(labels), fold)
    tables = [
        make_oof(f"{name}/16bit", result.val_ids, folds_column, probs16, labels),
        make_oof(f"{name}/quantized", result.val_ids, folds_column, probs_q, labels),
    ]
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
        "views_quantized": views_q,
    }
    del result, exported, shipped
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return fold_run, tables


def _model_bytes(model: nn.Module) -> int:
    return int(sum(t.numel() * t.element_size() for t in model.state_dict().values() if torch.is_tensor(t)))


def _finite(value: float | None) -> float | None:
    return None if value is None or not math.isfinite(value) else float(value)
