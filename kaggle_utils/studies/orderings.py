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
`register_variant(Variant(...))` from any module. This module imports `kaggle_utils.variants.qaware` at its top,
so the quantization-aware variants are registered whenever `compare` is imported.

Layout: `experiment.py` makes the shared setup (`prepare_experiment`) and runs one variant on one fold
(`run_fold`); `cv_report.py` aggregates, decides and draws (`ComparisonReport`); `ship.py` ranks every
candidate and writes what ships. This module is the loop over seeds, variants and folds that joins them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import class_prior, save_oof
from kaggle_utils.evaluate.cv_report import (
    ComparisonReport,
    aggregate_run,
    build_report,
    plot_report,
    render_markdown,
)
from kaggle_utils.evaluate.ship import seed_ensemble, ship_runs
from kaggle_utils.models.model_config import describe_checkpoint
from kaggle_utils.studies.experiment import prepare_experiment, run_fold, variant_config
from kaggle_utils.train.loop import distributed_state
from kaggle_utils.variants import qaware as _qaware_variants  # noqa: F401  registers the quantization-aware ones
from kaggle_utils.variants.registry import resolve_variants

logger = logging.getLogger(__name__)

REPORT_JSON, REPORT_MD, REPORT_PNG, OOF_FILE = "report.json", "report.md", "report.png", "oof.parquet"


def compare_orderings(
    cfg: PipelineConfig,
    train_path: str | Path,
    out_dir: str | Path,
    folds_path: str | Path | None = None,
    seeds: Sequence[int] = (42,),
    variants: Sequence[str] | None = None,
    progress: bool = True,
    baseline: tuple[pl.DataFrame, str | Path] | None = None,
) -> ComparisonReport | None:
    """Train each variant (default: both orderings) on the same folds/base/seed(s); write and return the report.

    Folds trained: `cfg.train.cv_folds` (None: every fold of the folds file). With several seeds the report
    gives mean ± std over seeds. Then the ship decision (`ship.py`): every variant's shipped model (first seed),
    the class prior, `baseline` when given (its OOF table on the same folds file, and its model file), their
    calibrated versions and the blend, ranked by cross-fitted CV on the same rows; the best is written as
    `shipped/` (or is a variant's own artifact) and named in the report's `ship` section. Returns the report
    (None on a non-main process of `accelerate launch`: the main one writes and reports).
    """
    requested = resolve_variants(variants)
    skipped = {v.name: reason for v in requested if v.unavailable and (reason := v.unavailable())}
    for name, reason in skipped.items():
        logger.warning("skipping variant %s: %s", name, reason)
    chosen = [v for v in requested if v.name not in skipped]
    if not chosen:
        raise UsageError(
            "no requested variant can run on this machine: "
            + "; ".join(f"{name}: {why}" for name, why in skipped.items())
        )
    if not seeds:
        raise UsageError("compare_orderings needs at least one seed")
    began = time.perf_counter()
    experiment = prepare_experiment(cfg, train_path, out_dir, folds_path)
    out_dir = experiment.out_dir

    runs: list[dict] = []
    oof_tables: list[pl.DataFrame] = []
    for seed in seeds:
        for variant in chosen:
            run_cfg = variant_config(cfg, variant, seed, experiment.base_dir)
            run_dir = out_dir / "runs" / f"seed{seed}" / variant.name
            folds_out = []
            for fold in experiment.fold_ids:
                fold_run, tables = run_fold(
                    experiment, run_cfg, variant, fold, seed, run_dir / f"fold{fold}", progress
                )
                if fold_run is None:  # not the main process: it only took its share of the training
                    continue
                folds_out.append(fold_run)
                oof_tables += tables
            if folds_out:
                runs.append(aggregate_run(variant, seed, folds_out, experiment.dialect))
    if not distributed_state().is_main_process:
        return None

    # One write for the whole run: every fold of every name at once (names of other runs in the file are kept).
    save_oof(
        pl.concat(oof_tables, how="vertical"),
        out_dir / OOF_FILE,
        replace="name",
        record=experiment.oof_record,
    )
    report = build_report(
        cfg,
        chosen,
        seeds,
        experiment.fold_ids,
        runs,
        experiment.frame,
        experiment.folds_path,
        experiment.folds_hash,
        experiment.device,
        began,
        model=describe_checkpoint(experiment.base_dir, cfg.model.base_model, cfg.model.init_seed),
    )
    report["skipped_variants"] = skipped
    report["ship"] = _ship(
        runs, seeds[0], experiment.folds, experiment.frame, out_dir, cfg.data.format, baseline
    )
    write_report(report, out_dir)
    return ComparisonReport.from_dict(report)


def write_report(report: dict, out_dir: Path) -> None:
    """report.json (the serialised report, private per-row arrays left out), report.md and report.png."""
    serialised = ComparisonReport.from_dict(report).to_dict()
    (out_dir / REPORT_JSON).write_text(json.dumps(serialised, indent=2), encoding="utf-8")
    (out_dir / REPORT_MD).write_text(render_markdown(serialised), encoding="utf-8")
    plot_report(serialised, out_dir / REPORT_PNG)


def _ship(
    runs: list[dict],
    seed: int,
    folds: pl.DataFrame,
    frame: pl.DataFrame,
    out_dir: Path,
    dialect: str,
    baseline: tuple[pl.DataFrame, str | Path] | None,
) -> dict:
    """The ship decision over the first seed's runs, each variant's seed ensemble when there are several seeds,
    and the baseline: `ship.ship_runs`."""
    groups_by_id = dict(zip(folds["id"].to_list(), folds["group"].to_list(), strict=True))
    prior = class_prior(frame["label"].to_numpy().astype(np.int64))
    baseline_rows = None
    if baseline is not None:
        table, model_path = baseline
        baseline_rows = (
            {row_id: np.array(p) for row_id, *p in table.select("id", "p_a", "p_b", "p_tie").iter_rows()},
            model_path,
        )
    candidates = [run["_shipped"] for run in runs if run["seed"] == seed]
    for name in dict.fromkeys(run["variant"] for run in runs):  # several seeds: their average is a candidate
        seeded = [run["_shipped"] for run in runs if run["variant"] == name]
        if len(seeded) > 1:
            candidates.append(seed_ensemble(seeded, f"{name}/seed-ensemble"))
    decision, shipped = ship_runs(candidates, groups_by_id, prior, out_dir, dialect, baseline_rows)
    return {**decision.to_dict(), "artifact": str(shipped), "reliability_png": "reliability.png"}
