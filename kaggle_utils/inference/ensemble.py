"""Ensemble artifacts (manifest `kind: ensemble`): their members (model folders, feature baselines, class
priors), each predicted through `replicas.run_models` under the one deadline, and blended by the manifest's
weights, renormalised per row over the members that served it.

    blended = run_ensemble(folder, manifest, frame, cfg, deadline, clock, runtime, wrap_forward, report)
    final, paths = fill_blend(blended, fallback)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kaggle_utils.core.config import LABEL_COLUMNS, InferenceConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.evaluate.ensembles import BlendedRows, blend_members
from kaggle_utils.inference.device_forward import ForwardFn, describe_error
from kaggle_utils.inference.replicas import run_models
from kaggle_utils.inference.report import InferenceReport
from kaggle_utils.inference.views import PATH_FALLBACK, calibrate_served, model_probabilities
from kaggle_utils.quant.artifacts import MANIFEST_NAME
from kaggle_utils.quant.manifest import check_ensemble_manifest
from kaggle_utils.text.swap import TTA_SPACES
from kaggle_utils.train.baseline import BaselineModel

logger = logging.getLogger(__name__)

# An ensemble's rows: every member served the row, or only some (weights renormalised over those).
PATH_ALL_MEMBERS, PATH_SOME_MEMBERS = "all_members", "some_members"


@dataclass
class EnsembleMember:
    """One member of an ensemble artifact: a model artifact folder, a feature-baseline JSON file, or a class
    prior (a constant row)."""

    name: str
    kind: str  # "model" | "baseline" | "prior"
    weight: float
    path: Path | None = None
    prior: tuple[float, ...] | None = None
    tta_space: str | None = None  # a model member's TTA space, chosen on OOF (else its own manifest's)

    @property
    def is_model(self) -> bool:
        """A model artifact folder (run through the schedule), not a baseline or a prior."""
        return self.kind == "model"

    def cost(self) -> int:
        """Bytes on disk: the proxy for a member's time per token (a 9B model costs more than a 2B one)."""
        if not self.is_model or self.path is None:
            return 0
        return sum(p.stat().st_size for p in self.path.rglob("*") if p.is_file())


MEMBER_KINDS = ("model", "baseline", "prior")  # what `EnsembleMember.kind` may be


def fill_blend(blended: BlendedRows, fallback: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The blend where some member served a row, `fallback` elsewhere; and each row's path name."""
    final = np.array(fallback, dtype=np.float64, copy=True)
    paths = np.full(len(final), PATH_FALLBACK, dtype=object)
    some = blended.members_served > 0
    final[some] = blended.probs[some]
    paths[some] = PATH_SOME_MEMBERS
    paths[blended.members_served == blended.n_members] = PATH_ALL_MEMBERS
    return final, paths


def ensemble_members(
    ensemble_dir: str | Path, manifest: dict, verify_hashes: bool = True
) -> list[EnsembleMember]:
    """The members the manifest names (paths relative to the ensemble folder, or absolute); a member without
    `kind` is a baseline when its path is a file, else a model. A self-contained ensemble (a `files` table)
    is checked first (`check_ensemble_manifest`). UsageError naming the member for a malformed one."""
    where = Path(ensemble_dir) / MANIFEST_NAME
    if "files" in manifest:
        check_ensemble_manifest(ensemble_dir, manifest, verify_hashes=verify_hashes)
    members = [
        _member_from_entry(entry, index, Path(ensemble_dir), where)
        for index, entry in enumerate(manifest.get("members") or [])
    ]
    if not members or sum(m.weight for m in members) <= 0:
        raise UsageError(f"{where}: an ensemble needs members with positive weight")
    if not math.isfinite(sum(m.weight for m in members)):
        raise UsageError(
            f"{where}: the members' weights sum to inf (not finite): "
            f"{[m.weight for m in members]}; give weights that sum to a finite number (e.g. 1)"
        )
    names = [m.name for m in members]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise UsageError(f"{where}: member names must be unique, repeated: {repeated}")
    return members


def _member_from_entry(entry: Any, index: int, ensemble_dir: Path, where: Path) -> EnsembleMember:
    """One `members[index]` entry of the manifest at `where`, checked: UsageError naming what is wrong."""
    try:
        weight = float(entry["weight"])
        path = Path(entry["path"]) if entry.get("path") else None
        if path is not None and not path.is_absolute():
            path = ensemble_dir / path
        kind = entry.get("kind") or ("baseline" if path is not None and path.is_file() else "model")
        prior = tuple(float(v) for v in entry["prior"]) if kind == "prior" else None
    except (KeyError, TypeError, ValueError) as error:
        raise UsageError(f"{where}: members[{index}] is malformed ({error!r})") from error
    if kind not in MEMBER_KINDS:
        raise UsageError(f"{where}: members[{index}].kind {kind!r} is not one of {list(MEMBER_KINDS)}")
    if not (math.isfinite(weight) and weight >= 0):
        raise UsageError(f"{where}: members[{index}].weight must be >= 0 and finite, got {weight}")
    if kind != "prior" and path is None:
        raise UsageError(f"{where}: members[{index}] ({kind}) needs a path")
    if prior is not None and (len(prior) != len(LABEL_COLUMNS) or min(prior) < 0 or sum(prior) <= 0):
        raise UsageError(f"{where}: members[{index}].prior must be {len(LABEL_COLUMNS)} non-negative numbers")
    tta_space = entry.get("tta_space")
    if tta_space is not None and tta_space not in TTA_SPACES:
        raise UsageError(f"{where}: members[{index}].tta_space must be one of {list(TTA_SPACES)}")
    return EnsembleMember(
        name=str(entry.get("name") or (path.name if path else kind)),
        kind=kind,
        weight=weight,
        path=path,
        prior=prior,
        tta_space=tta_space,
    )


@dataclass
class _MemberRun:
    """One member's predictions (NaN rows: not served), its own report, and its non-finite rows."""

    probs: np.ndarray
    report: InferenceReport
    nonfinite: int = 0  # rows that were not finite (a NaN prior, a broken baseline): left out of the blend


def run_ensemble(
    ensemble_dir: str | Path,
    manifest: dict,
    frame: Any,
    cfg: InferenceConfig,
    deadline: float,
    clock: Callable[[], float],
    runtime: Any,
    wrap_forward: Callable[[ForwardFn, str], ForwardFn] | None,
    report: InferenceReport,
) -> BlendedRows:
    """Predict every member and blend them. Baseline and prior members first; model members cheapest first
    under the one deadline (or side by side with `ensemble_layout="member_per_device"`), so the time guard
    cuts the most expensive member first. A member that fails is recorded and left out of its rows' blend."""
    members = ensemble_members(ensemble_dir, manifest, verify_hashes=cfg.verify_hashes)
    # a self-contained ensemble's files were all checked just now: its model members are not hashed again
    member_cfg = dataclasses.replace(cfg, verify_hashes=False) if "files" in manifest else cfg
    runs = {
        member.name: _MemberRun(
            np.full((frame.height, len(LABEL_COLUMNS)), np.nan),
            InferenceReport(
                submission_path=report.submission_path,
                test_path=report.test_path,
                artifact_dir=str(member.path or member.kind),
            ),
        )
        for member in members
    }

    def run_member(member: EnsembleMember, member_runtime: Any) -> None:
        _predict_member(
            member, runs[member.name], frame, member_cfg, deadline, clock, member_runtime, wrap_forward
        )

    for member in (m for m in members if not m.is_model):
        run_member(member, runtime)
    models = sorted((m for m in members if m.is_model), key=EnsembleMember.cost)
    layout = _run_model_members(models, runtime, cfg.ensemble_layout, run_member)
    blended = blend_members([runs[m.name].probs for m in members], [m.weight for m in members])
    weighted = [m for m in members if m.weight > 0]
    counted = [m for m in weighted if m.is_model] or weighted  # no model member: what ships is the blend
    report.model_rows = int(
        np.any([np.all(np.isfinite(runs[m.name].probs), axis=1) for m in counted], axis=0).sum()
    )
    blended.probs = calibrate_served(blended.probs, manifest.get("calibration"))  # the blend's own, if fitted
    report.runtime = runtime.to_dict()
    report.schedule = {"ensemble_layout": layout}
    for member in members:
        _add_member_to_report(member, runs[member.name], report)
    return blended


def _predict_member(
    member: EnsembleMember,
    run: _MemberRun,
    frame: Any,
    cfg: InferenceConfig,
    deadline: float,
    clock: Callable[[], float],
    runtime: Any,
    wrap_forward: Callable[[ForwardFn, str], ForwardFn] | None,
) -> None:
    """Fill `run` with one member's predictions; a failure is recorded in `run.report`, never raised (the
    other members still serve these rows)."""
    n_rows = frame.height
    try:
        if member.kind == "prior":
            prior = np.asarray(member.prior, dtype=np.float64)
            run.probs = np.tile(prior / prior.sum(), (n_rows, 1))
            run.nonfinite = _record_nonfinite(
                member, run.probs, run.report, f"prior {list(member.prior)} is not finite"
            )
            return
        if member.kind == "baseline":
            predicted = np.asarray(BaselineModel.load(member.path).predict_proba(frame), dtype=np.float64)
            if predicted.shape != (n_rows, len(LABEL_COLUMNS)):
                raise ValueError(f"baseline member returned shape {predicted.shape} for {n_rows} rows")
            run.probs = predicted
            bad = ~np.all(np.isfinite(predicted), axis=1)
            if bad.any():
                first_id = frame["id"][int(np.argmax(bad))]
                what = f"{member.path} predicted non-finite probabilities (first id {first_id})"
                run.nonfinite = _record_nonfinite(member, predicted, run.report, what)
            return
        views = run_models(member.path, frame, cfg, deadline, clock, runtime, wrap_forward, run.report)
        member_manifest = json.loads((member.path / MANIFEST_NAME).read_text(encoding="utf-8"))
        if member.tta_space:
            member_manifest = {**member_manifest, "tta_space": member.tta_space}
        run.probs, _ = model_probabilities(views, member_manifest)
    except Exception as error:  # the other members still serve these rows
        run.report.errors.append({"where": f"ensemble member {member.name}", **describe_error(error)})
        logger.error(
            "ensemble member %s failed: %r (its rows are blended from the others)", member.name, error
        )


def _run_model_members(
    models: list[EnsembleMember],
    runtime: Any,
    layout: str,
    run_member: Callable[[EnsembleMember, Any], None],
) -> str:
    """Run the model members one after the other, or with `member_per_device` (and a device per member, not
    on TPU) side by side, each on its share of the devices. Returns the layout that ran, for the report."""
    if layout == "member_per_device" and (len(runtime.devices) < len(models) or runtime.kind == "tpu"):
        logger.warning(
            "ensemble_layout member_per_device needs a device per model member (%d members, %d "
            "devices): running them one after the other",
            len(models),
            len(runtime.devices),
        )
        layout = "sequential (member_per_device needs a device per member)"
    if layout != "member_per_device":
        for member in models:
            run_member(member, runtime)
        return layout
    threads = [
        threading.Thread(
            target=run_member,
            daemon=True,
            name=f"member-{member.name}",
            args=(member, dataclasses.replace(runtime, devices=runtime.devices[i :: len(models)])),
        )
        for i, member in enumerate(models)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        while thread.is_alive():
            thread.join(timeout=0.5)
    return layout


def _add_member_to_report(member: EnsembleMember, run: _MemberRun, report: InferenceReport) -> None:
    """The member's line in `report.members` (weight, rows served, its schedule), and its errors."""
    served = np.all(np.isfinite(run.probs), axis=1)
    report.members.append(
        {
            "name": member.name,
            "path": str(member.path) if member.path else None,
            "weight": member.weight,
            "kind": member.kind,
            "rows_served": int(served.sum()),
            "rows_nonfinite": run.nonfinite,
            "schedule": run.report.schedule,
            "timings_s": run.report.timings_s,
        }
    )
    report.errors.extend(run.report.errors)
    for error in run.report.schedule.get("errors", []):
        report.errors.append({"member": member.name, **error})


def _record_nonfinite(
    member: EnsembleMember, probs: np.ndarray, member_report: InferenceReport, what: str
) -> int:
    """Count a member's non-finite rows (left out of their blend, like rows it did not serve), record why in
    its errors, and return the count."""
    bad = int((~np.all(np.isfinite(probs), axis=1)).sum())
    if not bad:
        return 0
    message = f"{what}: left out of the blend of {bad} of {len(probs)} rows"
    member_report.errors.append(
        {"where": f"ensemble member {member.name}", "type": "NonFiniteProbabilities", "message": message}
    )
    logger.error("ensemble member %s: %s", member.name, message)
    return bad
