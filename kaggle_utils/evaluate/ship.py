"""Writing what ships: the chosen candidate as the folder `predict --artifact` takes, self-contained.

`ship_runs(runs, groups_by_id, prior, out_dir, dialect)` ranks the runs' candidates (`candidates.py`) and
writes the choice (`write_shipped`), `ship.json` and `reliability.png`; `ship_artifact` puts the fallback
baseline inside one model artifact (the `ship` command). Layout: docs/DESIGN_NOTES.md, "evaluate/ship.py".
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kaggle_utils import __version__
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import atomic_write_bytes, check_output_apart, file_sha256, link_or_copy
from kaggle_utils.evaluate.calibration import plot_reliability
from kaggle_utils.evaluate.candidates import (
    CALIBRATION_METHOD,
    Candidate,
    ShipDecision,
    build_candidates,
    decide_ship,
)
from kaggle_utils.quant.artifacts import staged_folder
from kaggle_utils.quant.layout import MANIFEST_NAME
from kaggle_utils.quant.manifest import (
    ENSEMBLE_KIND,
    check_ensemble_manifest,
    read_manifest,
    read_manifest_json,
)
from kaggle_utils.train.baseline import MANIFEST_SUFFIX as BASELINE_MANIFEST_SUFFIX
from kaggle_utils.train.baseline import BaselineModel, baseline_manifest_path


def write_shipped(
    decision: ShipDecision,
    out_dir: str | Path,
    *,
    class_prior: np.ndarray,
    dialect: str,
    baseline: str | Path | None = None,
) -> Path:
    """What `predict --artifact` takes for `decision.best`: a plain model's own folder (nothing written) or a
    folder at `out_dir` (the model's copy with `baseline` inside, or an ensemble of copies of its members).
    Refused (UsageError, nothing written): an `out_dir` overlapping a source, or holding something else."""
    best = decision.best
    plain = best.kind == "model" and len(best.members) == 1 and not best.members[0].get("tta_space")
    if plain and baseline is None:
        return Path(best.members[0]["path"])
    out_dir = Path(out_dir)
    sources = [Path(m["path"]) for m in best.members if m.get("path")]
    check_output_apart(
        out_dir, [("ensemble member", path) for path in sources] + [("fallback baseline", baseline)]
    )
    _refuse_replacing_other_folders(out_dir)
    with staged_folder(out_dir) as staging:
        if plain:
            _ship_plain_model(Path(best.members[0]["path"]), Path(baseline), staging)
        else:
            _ship_ensemble(decision, staging, class_prior=class_prior, dialect=dialect, baseline=baseline)
    return out_dir


def _refuse_replacing_other_folders(out_dir: Path) -> None:
    """A shipped folder replaces only a previous shipped artifact (or nothing, or an empty folder)."""
    if (
        out_dir.is_symlink()
        or out_dir.exists()
        and not (out_dir / MANIFEST_NAME).is_file()
        and (not out_dir.is_dir() or any(out_dir.iterdir()))
    ):
        raise UsageError(
            f"refusing to replace {out_dir}: it is not a shipped artifact (no {MANIFEST_NAME}); "
            f"choose another output"
        )


SHIPPED_MEMBERS_DIR = "members"  # an ensemble folder's copies of its model members
SHIPPED_BASELINE = "baseline.json"  # the fallback baseline inside what ships (find_inputs seeks this name)


def _ship_ensemble(
    decision: ShipDecision,
    folder: Path,
    *,
    class_prior: np.ndarray,
    dialect: str,
    baseline: str | Path | None,
) -> None:
    """Copy the winner's members (each source once) and the fallback baseline into `folder`; write its
    manifest naming them relative to it, with every file's bytes and sha256."""
    best = decision.best
    files: dict[str, dict] = {}
    copied: dict[Path, str] = {}  # resolved source -> its path inside the folder
    fallback = Path(baseline).resolve() if baseline is not None else None
    if fallback is not None:
        files.update(_copy_baseline(fallback, folder, SHIPPED_BASELINE))
        copied[fallback] = SHIPPED_BASELINE
    used: set[str] = set()
    members = []
    for member in best.members:
        if not member.get("path"):
            members.append(dict(member))
            continue
        source = Path(member["path"]).resolve()
        if source not in copied:
            name = _member_folder_name(str(member.get("name") or source.name), used)
            if member.get("kind") == "baseline" or (member.get("kind") is None and source.is_file()):
                copied[source] = f"{SHIPPED_MEMBERS_DIR}/{name}.json"
                files.update(_copy_baseline(source, folder, copied[source]))
            else:
                copied[source] = f"{SHIPPED_MEMBERS_DIR}/{name}"
                files.update(_copy_model(source, folder, copied[source]))
        members.append({**member, "path": copied[source]})
    manifest = {
        "kind": ENSEMBLE_KIND,
        "name": best.name,
        "members": members,
        "calibration": best.calibration,
        "class_prior": [float(v) for v in class_prior],
        "dialect": dialect,
        "cv_scores": {"log_loss": best.cv_log_loss, "rows": decision.rows, "statement": decision.statement},
        "fallback_baseline": SHIPPED_BASELINE if fallback is not None else None,
        "package_version": __version__,
        "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "files": dict(sorted(files.items())),
    }
    check_ensemble_manifest(folder, manifest, verify_hashes=False)  # copies already checked one by one
    atomic_write_bytes(folder / MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))


def _ship_plain_model(source: Path, baseline: Path, folder: Path) -> None:
    """A copy of the model's artifact in `folder` with the fallback baseline added to its manifest's files."""
    table = _copy_model(source, folder, ".")
    manifest = json.loads((folder / MANIFEST_NAME).read_text(encoding="utf-8"))
    added = _copy_baseline(baseline.resolve(), folder, SHIPPED_BASELINE)
    manifest["files"] = {**{k: v for k, v in table.items() if k != MANIFEST_NAME}, **added}
    manifest["fallback_baseline"] = SHIPPED_BASELINE
    # a new file, not written through the link: the source artifact's manifest stays as it was
    atomic_write_bytes(folder / MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))
    read_manifest(folder, verify_hashes=False)


def ship_artifact(artifact_dir: str | Path, out_dir: str | Path, baseline: str | Path) -> Path:
    """Copy a model artifact to `out_dir` with the feature baseline inside it as `baseline.json` (what the
    `ship` command runs). The artifact is checked and left untouched; an overlapping or foreign `out_dir` is
    refused."""
    artifact_dir, out_dir, baseline = Path(artifact_dir), Path(out_dir), Path(baseline)
    check_output_apart(out_dir, [("artifact", artifact_dir), ("fallback baseline", baseline)])
    if not baseline.is_file():
        raise UsageError(
            f"fallback baseline {baseline} not found: save one with `baseline --save-model FILE`"
        )
    BaselineModel.load(baseline)  # its sha256 manifest checked: a damaged baseline is refused here
    if read_manifest_json(artifact_dir).get("kind") == ENSEMBLE_KIND:
        raise UsageError(
            f"{artifact_dir} is an ensemble: it carries its fallback baseline when shipped by "
            "compare-orderings or combine-reports (ship.write_shipped)"
        )
    read_manifest(artifact_dir)  # a complete model artifact; the copy's sha256s are checked as it is made
    _refuse_replacing_other_folders(out_dir)
    with staged_folder(out_dir) as staging:
        _ship_plain_model(artifact_dir, baseline, staging)
    return out_dir


def _member_folder_name(name: str, used: set[str]) -> str:
    """A file-system-safe, unique folder name for a member ("ftq/fold0" -> "ftq_fold0")."""
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-") or "member"
    candidate, number = base, 2
    while candidate in used:
        candidate, number = f"{base}-{number}", number + 1
    used.add(candidate)
    return candidate


def _copy_model(source: Path, folder: Path, relative: str) -> dict[str, dict]:
    """Copy a model artifact's listed files and manifest into `folder/relative`, checked against every sha256.
    Returns its files table, paths from `folder`."""
    manifest = read_manifest(source, allow_unlisted=True)
    target = folder / relative
    for file in [*manifest["files"], MANIFEST_NAME]:
        link_or_copy(source / file, target / file)
    read_manifest(target, verify_hashes=True)
    prefix = "" if relative == "." else f"{relative}/"
    table = {f"{prefix}{file}": dict(info) for file, info in manifest["files"].items()}
    table[f"{prefix}{MANIFEST_NAME}"] = {
        "bytes": (target / MANIFEST_NAME).stat().st_size,
        "sha256": file_sha256(target / MANIFEST_NAME),
    }
    return table


def _copy_baseline(source: Path, folder: Path, relative: str) -> dict[str, dict]:
    """A saved baseline (JSON + its `<name>.manifest.json`) as `folder/relative`, its manifest naming the new
    file; both checked by loading the copy. Returns the two files' table entries."""
    BaselineModel.load(source)  # listed in its manifest, intact, this code's format
    data = source.read_bytes()
    sidecar = json.loads(baseline_manifest_path(source).read_text(encoding="utf-8"))
    target = folder / relative
    sidecar["files"] = {target.name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}}
    sidecar_data = json.dumps(sidecar, indent=2).encode("utf-8")
    atomic_write_bytes(target, data)
    atomic_write_bytes(baseline_manifest_path(target), sidecar_data)
    BaselineModel.load(target)
    return {
        relative: sidecar["files"][target.name],
        f"{relative}{BASELINE_MANIFEST_SUFFIX}": {
            "bytes": len(sidecar_data),
            "sha256": hashlib.sha256(sidecar_data).hexdigest(),
        },
    }


@dataclass
class ShippedRun:
    """One trained (variant, seed) as a ship candidate: OOF rows (ids in order), each row's training-part
    class prior, and the artifact of every fold that produced them (several folds ship as a fold ensemble)."""

    name: str
    ids: list
    labels: np.ndarray
    probs: np.ndarray
    row_priors: np.ndarray
    artifact_dirs: list[str]
    views: np.ndarray | None = None  # (2, rows, 3) original and swapped view (swapped columns) with swap TTA


def seed_ensemble(runs: list[ShippedRun], name: str) -> ShippedRun:
    """One variant trained with several seeds on the same folds, averaged: its OOF is the mean of the seeds'
    (rows aligned by id) and it ships every seed's fold artifacts with equal weights."""
    first = runs[0]
    order = {row_id: index for index, row_id in enumerate(first.ids)}
    stacked = []
    for run in runs:
        if sorted(run.ids, key=str) != sorted(first.ids, key=str):
            raise UsageError(f"{name}: the seeds were scored on different rows")
        aligned = np.empty_like(run.probs)
        aligned[np.array([order[row_id] for row_id in run.ids])] = run.probs
        stacked.append(aligned)
    return ShippedRun(
        name=name,
        ids=list(first.ids),
        labels=first.labels,
        probs=np.mean(stacked, axis=0),
        row_priors=first.row_priors,
        artifact_dirs=[d for run in runs for d in run.artifact_dirs],
    )


def ship_runs(
    runs: list[ShippedRun],
    groups_by_id: dict,
    prior: np.ndarray,
    out_dir: str | Path,
    dialect: str,
    baseline: tuple[dict, str | Path] | None = None,
) -> tuple[ShipDecision, Path]:
    """Rank the runs' models, the baseline (`baseline`: (id -> OOF probs, model file)), the class prior, their
    calibrated versions and the blend on the runs' common OOF rows; write what ships under `out_dir` with
    `ship.json` and `reliability.png`. Returns the decision and the path `predict --artifact` takes."""
    out_dir = Path(out_dir)
    first = runs[0]
    models, tta_views = _aligned_models(runs)
    labels, groups = first.labels, np.array([groups_by_id[row_id] for row_id in first.ids])
    candidates = build_candidates(
        labels,
        groups,
        {name: (p, "") for name, (p, _) in models.items()},
        prior_probs=first.row_priors,
        prior=prior,
        baseline=_baseline_oof(baseline, first.ids),
        tta_views=tta_views,
    )
    for candidate in candidates:  # a model's members: its fold artifacts, equal weights (a fold ensemble)
        candidate.members = [member for m in candidate.members for member in _fold_members(m, models)]
    decision = decide_ship(labels, candidates)
    _plot_best_model_reliability(labels, candidates, out_dir / "reliability.png")
    shipped = write_shipped(
        decision,
        out_dir / "shipped",
        class_prior=prior,
        dialect=dialect,
        baseline=baseline[1] if baseline is not None else None,
    )
    record = {**decision.to_dict(), "artifact": str(shipped), "reliability_png": "reliability.png"}
    atomic_write_bytes(out_dir / "ship.json", json.dumps(record, indent=2).encode("utf-8"))
    return decision, shipped


def _aligned_models(
    runs: list[ShippedRun],
) -> tuple[dict[str, tuple[np.ndarray, list[str]]], dict[str, np.ndarray]]:
    """Each run's OOF probabilities (and swap-TTA views) in the first run's row order, and its fold
    artifacts."""
    first = runs[0]
    order = {row_id: index for index, row_id in enumerate(first.ids)}
    models: dict[str, tuple[np.ndarray, list[str]]] = {}
    tta_views: dict[str, np.ndarray] = {}
    for run in runs:
        if sorted(run.ids, key=str) != sorted(first.ids, key=str):
            raise UsageError(f"{run.name} was scored on other rows than {first.name}: not comparable")
        index = np.array([order[row_id] for row_id in run.ids])
        probs = np.empty_like(run.probs)
        probs[index] = run.probs
        models[run.name] = (probs, run.artifact_dirs)
        if run.views is not None:
            views = np.empty_like(run.views)
            views[:, index] = run.views
            tta_views[run.name] = views
    return models, tta_views


def _baseline_oof(
    baseline: tuple[dict, str | Path] | None, ids: list
) -> tuple[np.ndarray, str | Path] | None:
    """The baseline's OOF probabilities in the runs' row order and its model file (None: no baseline)."""
    if baseline is None:
        return None
    by_id, model_path = baseline
    missing = [row_id for row_id in ids if row_id not in by_id]
    if missing:
        raise UsageError(
            f"the baseline OOF lacks {len(missing)} of the runs' rows (e.g. {missing[:5]}): "
            "make it on the same folds file"
        )
    return np.stack([by_id[row_id] for row_id in ids]), model_path


def _plot_best_model_reliability(labels: np.ndarray, candidates: list[Candidate], path: Path) -> None:
    """The reliability diagram of the best single model, before and after (cross-fitted) calibration."""
    best_model = min((c for c in candidates if c.kind == "model"), key=lambda c: c.cv_log_loss)
    calibrated = next((c for c in candidates if c.name == f"{best_model.name}+{CALIBRATION_METHOD}"), None)
    curves = {f"{best_model.name} (raw)": best_model.probs}
    if calibrated is not None:
        curves[f"{calibrated.name} (cross-fitted)"] = calibrated.probs
    plot_reliability(labels, curves, path)


def _fold_members(member: dict, models: dict[str, tuple[np.ndarray, list[str]]]) -> list[dict]:
    if member.get("kind") != "model":
        return [member]
    folds = models[member.get("source", member["name"])][1]
    if len(folds) == 1:
        return [{**member, "path": folds[0]}]
    return [
        {
            **member,
            "name": f"{member['name']}/fold{index}",
            "path": path,
            "weight": member["weight"] / len(folds),
        }
        for index, path in enumerate(folds)
    ]
