"""Which ordering wins: fine-tune -> quantize or quantize -> fine-tune, on identical folds, base and seeds.

`compare_orderings(cfg, train_path, out_dir)` trains every requested variant (`variants.registry`) on each
fold (`experiment.run_fold`), aggregates and decides (`cv_report`), ranks the ship candidates (`ship`) and
writes report.json, report.md, report.png and oof.parquet under `out_dir`. What is measured and how the
variants plug in: docs/DESIGN_NOTES.md, "studies/orderings.py".
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
from kaggle_utils.evaluate.comparison_report import ComparisonReport
from kaggle_utils.evaluate.cv_report import aggregate_run, build_report
from kaggle_utils.evaluate.report_render import plot_report, render_markdown
from kaggle_utils.evaluate.ship import seed_ensemble, ship_runs
from kaggle_utils.models.model_config import describe_checkpoint
from kaggle_utils.studies.experiment import Experiment, prepare_experiment, run_fold, variant_config
from kaggle_utils.train.model_setup import distributed_state
from kaggle_utils.variants import qaware as _qaware_variants  # noqa: F401  registers the quantization-aware ones
from kaggle_utils.variants.registry import Variant, resolve_variants

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
    """Train each variant (default: both orderings) on folds `cfg.train.cv_folds` (None: all) with every seed,
    rank the ship candidates (with `baseline`: its OOF table and model file) and write the report. Returns it
    (None on a non-main process of `accelerate launch`: the main one writes and reports)."""
    chosen, skipped = _runnable_variants(variants)
    if not seeds:
        raise UsageError("compare_orderings needs at least one seed")
    began = time.perf_counter()
    experiment = prepare_experiment(cfg, train_path, out_dir, folds_path)
    out_dir = experiment.out_dir

    runs, oof_tables = _train_runs(experiment, cfg, chosen, seeds, progress)
    if not distributed_state().is_main_process:
        return None
    # One write for the whole run: every fold of every name at once (other runs' names in the file are kept).
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


def _runnable_variants(variants: Sequence[str] | None) -> tuple[list[Variant], dict[str, str]]:
    """The requested variants this machine can run, and name -> why for those it cannot (logged)."""
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
    return chosen, skipped


def _train_runs(
    experiment: Experiment, cfg: PipelineConfig, chosen: list[Variant], seeds: Sequence[int], progress: bool
) -> tuple[list[dict], list[pl.DataFrame]]:
    """Every (seed, variant) trained on every fold: the aggregated runs and the OOF tables (none on a
    non-main process, which only takes its share of the training)."""
    runs: list[dict] = []
    oof_tables: list[pl.DataFrame] = []
    for seed in seeds:
        for variant in chosen:
            run_cfg = variant_config(cfg, variant, seed, experiment.base_dir)
            run_dir = experiment.out_dir / "runs" / f"seed{seed}" / variant.name
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
    return runs, oof_tables


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
    """`ship.ship_runs` over the first seed's runs, each variant's seed ensemble (several seeds) and the
    baseline."""
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
