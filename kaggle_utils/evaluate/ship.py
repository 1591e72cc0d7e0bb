"""The ship decision: rank every candidate by the CV of exactly what would be shipped, choose what ships by a
rule that prefers the simplest candidate when a lead is noise, and report the CV of that choice nested.

Candidates, all scored on the same out-of-fold rows (the ids every source has):

* each trained variant's shipped artifact (its OOF as `inference.score_rows` made it);
* the feature baseline (its OOF: each row predicted by the fold model that did not see it);
* the class prior (each row gets its training part's prior: what an artifact's fallback would write);
* each model calibrated (`calibration.py`: temperature, optionally a per-class bias);
* the blend of all of them (`ensembles.fit_blend_weights`: non-negative weights summing to one).

Anything fitted on OOF rows (a calibration, blend weights) is scored cross-fitted: the OOF rows are split into
`CROSS_FIT_SPLITS` parts by prompt group, each part scored by what was fitted on the others, so its CV is not
the in-sample figure the fit optimised. What ships is then fitted on every OOF row. The post-processing is
applied by the functions `predict` applies (`ensembles.blend_members`, `calibration.apply_calibration`), so the
CV figure and the submission describe the same thing.

`decide_ship` ranks them and applies the selection rule (`select`): the lowest CV ships unless a simpler
candidate (`Candidate.complexity`: class prior < single model < + logit-space TTA < + temperature < blend) is
within noise of it (its deficit at most `NOISE_Z` paired standard errors); then the simplest such one ships, and
the statement says so. Choosing among ~12 candidates on the rows that then score the choice is optimistic (the
winner's curse), so the shipped CV reported is nested: for each cross-fit split, the rule chooses on the other
splits' rows only (anything fitted, fitted without the split), and the choice is scored on the split.
`write_shipped` writes what `predict --artifact` takes, self-contained (movable, uploadable with `upload-artifact`):
the winning artifact folder itself when it is one plain model and no fallback baseline is to travel with it, else
a folder holding copies of every member (`kind: ensemble`: members, weights, calibration, every file's sha256)
and the feature baseline as `baseline.json`, the fallback `runtime.find_inputs` finds inside the artifact.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold

from kaggle_utils import __version__
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import atomic_write_bytes, check_output_apart, file_sha256, link_or_copy
from kaggle_utils.core.metrics import log_loss, row_log_losses
from kaggle_utils.evaluate.calibration import apply_calibration, fit_calibration, plot_reliability
from kaggle_utils.evaluate.ensembles import blend_members, fit_blend_weights
from kaggle_utils.quant.artifacts import (
    ENSEMBLE_KIND,
    check_ensemble_manifest,
    read_manifest,
    read_manifest_json,
    staged_folder,
)
from kaggle_utils.quant.layout import MANIFEST_NAME
from kaggle_utils.text.formatting import average_views
from kaggle_utils.train.baseline import MANIFEST_SUFFIX as BASELINE_MANIFEST_SUFFIX
from kaggle_utils.train.baseline import BaselineModel, baseline_manifest_path

CROSS_FIT_SPLITS = 5
NOISE_Z = 2.0  # a lead counts when it exceeds this many paired standard errors (as compare's decision)
CALIBRATION_METHOD = "temperature"
# How complex a candidate is, for "ship the simplest within noise": the class prior fits nothing; a single trained
# model (or the feature baseline) as trained; + logit-space TTA is a fixed choice of how to average its two views
# (nothing fitted on OOF rows); + temperature fits a parameter on OOF rows; a blend fits weights over several.
COMPLEXITY = {"prior": 0, "model": 1, "baseline": 1, "calibrated": 3, "blend": 5}
LOGIT_TTA_STEP, CALIBRATION_STEP = 1, 2  # added to the candidate it is made from
SELECTION_RULE = (
    f"the lowest CV log loss, unless a simpler candidate is within {NOISE_Z:g} paired standard "
    "errors of it: then the simplest such one (class prior < single model < + logit-space TTA < "
    "+ temperature < blend; among equals the lower CV)"
)


@dataclass
class Candidate:
    """One thing that could be shipped, with its OOF probabilities on the common rows and how to build it.

    `probs` are cross-fitted when something in the candidate is fitted on OOF rows (split k's rows by what was
    fitted on the other splits); `inner_probs[k]` are then its probabilities on the rows outside split k with
    the fit cross-fitted among those rows only (what choosing inside split k may look at); None when nothing
    is fitted on OOF rows. `splits`: each row's cross-fit split (`build_candidates` sets it). `complexity`:
    the order "ship the simplest within noise" uses (default from `kind`, `COMPLEXITY`)."""

    name: str
    kind: str  # "model" | "baseline" | "prior" | "calibrated" | "blend"
    probs: np.ndarray = field(repr=False)
    members: list[dict]  # ensemble members (inference.ensemble_members' format) that make it
    calibration: dict | None = None
    note: str = ""
    cv_log_loss: float = math.nan
    complexity: int | None = None
    splits: np.ndarray | None = field(default=None, repr=False)
    inner_probs: dict[int, np.ndarray] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.complexity is None:
            self.complexity = COMPLEXITY[self.kind]

    def selection_probs(self, split: int, splits: np.ndarray | None = None) -> np.ndarray:
        """Its probabilities on the rows outside `split` (in row order), fitted without `split`'s rows."""
        splits = self.splits if splits is None else splits
        if self.inner_probs is not None:
            return self.inner_probs[split]
        return self.probs[np.asarray(splits) != split]

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "complexity": self.complexity,
            "cv_log_loss": self.cv_log_loss,
            "note": self.note,
            "members": self.members,
            "calibration": self.calibration,
        }


@dataclass
class ShipDecision:
    """The ranked candidates (lowest CV first), what ships (`best`: the selection rule's choice, `select`) and
    why. `runner_up_difference`, `standard_error`, `within_noise`: the lowest CV's lead over the runner-up.
    `lead_over_shipped`: (difference, paired standard error) of the lowest CV over what ships, when a simpler
    candidate ships. `nested_cv_log_loss`: the shipped CV with the choice made inside each cross-fit split
    (`nested_choices[k]` chose on the other splits' rows, scored on split k's); None without splits."""

    ranking: list[Candidate]
    rows: int
    runner_up_difference: float | None
    standard_error: float | None
    within_noise: bool | None
    statement: str
    shipped: Candidate | None = None
    lead_over_shipped: tuple[float, float] | None = None
    nested_cv_log_loss: float | None = None
    nested_choices: list[str] = field(default_factory=list)

    @property
    def best(self) -> Candidate:
        """The candidate that ships."""
        return self.ranking[0] if self.shipped is None else self.shipped

    def to_dict(self) -> dict[str, Any]:
        lead = (
            None
            if self.lead_over_shipped is None
            else {"difference": self.lead_over_shipped[0], "standard_error": self.lead_over_shipped[1]}
        )
        return {
            "shipped": self.best.name,
            "rows": self.rows,
            "statement": self.statement,
            "shipped_cv_log_loss": self.best.cv_log_loss,
            "nested_cv_log_loss": self.nested_cv_log_loss,
            "splits": len(self.nested_choices) or None,
            "nested_choices": self.nested_choices,
            "selection_rule": SELECTION_RULE,
            "lowest_cv": self.ranking[0].name,
            "lead_over_shipped": lead,
            "runner_up_difference": self.runner_up_difference,
            "standard_error": self.standard_error,
            "within_noise": self.within_noise,
            "ranking": [c.summary() for c in self.ranking],
        }

    def markdown(self) -> list[str]:
        lines = ["| rank | candidate | kind | complexity | CV log loss | note |", "|---|---|---|---|---|---|"]
        for rank, candidate in enumerate(self.ranking, 1):
            lines.append(
                f"| {rank} | {candidate.name} | {candidate.kind} | {candidate.complexity} | "
                f"{candidate.cv_log_loss:.4f} | {candidate.note} |"
            )
        return [*lines, "", self.statement]


def cross_fit_splits(groups: np.ndarray, n_splits: int = CROSS_FIT_SPLITS) -> np.ndarray:
    """Each OOF row's split (0..k-1), whole prompt groups together, so nothing fitted on a part sees the
    prompts it is scored on."""
    groups = np.asarray(groups)
    n_splits = min(n_splits, len(np.unique(groups)))
    if n_splits < 2:
        raise UsageError("cross-fitting needs OOF rows from at least two prompt groups")
    split = np.empty(len(groups), dtype=np.int64)
    for index, (_, scored) in enumerate(GroupKFold(n_splits=n_splits).split(groups, groups=groups)):
        split[scored] = index
    return split


def cross_fitted_calibration(
    labels: np.ndarray, probs: np.ndarray, splits: np.ndarray, method: str = CALIBRATION_METHOD
) -> np.ndarray:
    """Each split's rows calibrated by what was fitted on the other splits: the honest OOF of calibrating
    (one split alone, as inside a nested split of two-group data, is fitted on its own rows)."""
    out = np.empty_like(probs, dtype=np.float64)
    for split in np.unique(splits):
        scored = splits == split
        fit_rows = ~scored if len(np.unique(splits)) > 1 else scored
        fitted = fit_calibration(labels[fit_rows], probs[fit_rows], method=method)
        out[scored] = apply_calibration(probs[scored], fitted)
    return out


def cross_fitted_blend(
    labels: np.ndarray, member_probs: dict[str, np.ndarray], splits: np.ndarray
) -> np.ndarray:
    """Each split's rows blended with weights fitted on the other splits (`ensembles.blend_members`; one split
    alone is fitted on its own rows)."""
    names = list(member_probs)
    n_rows = len(labels)
    out = np.empty((n_rows, 3), dtype=np.float64)
    for split in np.unique(splits):
        scored = splits == split
        fit_rows = ~scored if len(np.unique(splits)) > 1 else scored
        weights = fit_blend_weights(
            labels[fit_rows], {n: p[fit_rows] for n, p in member_probs.items()}
        ).weights
        out[scored] = blend_members(
            [member_probs[n][scored] for n in names], [weights[n] for n in names]
        ).probs
    return out


def nested_cross_fit(
    splits: np.ndarray, cross_fitted: Callable[[np.ndarray], np.ndarray]
) -> dict[int, np.ndarray]:
    """For each split k, `cross_fitted(rows)` on the rows outside k (a boolean mask; it cross-fits among
    those rows' own splits): a fitted candidate's probabilities for choosing inside split k, none of them
    fitted on split k's labels (`Candidate.inner_probs`)."""
    return {int(split): cross_fitted(np.asarray(splits) != split) for split in np.unique(splits)}


def build_candidates(
    labels: np.ndarray,
    groups: np.ndarray,
    models: dict[str, tuple[np.ndarray, str | Path]],
    prior_probs: np.ndarray,
    prior: np.ndarray,
    baseline: tuple[np.ndarray, str | Path] | None = None,
    calibrate: bool = True,
    blend: bool = True,
    tta_views: dict[str, np.ndarray] | None = None,
) -> list[Candidate]:
    """Every candidate on the same rows. `models`: name -> (OOF probs, artifact folder); `prior_probs`: each
    row's training-part class prior (the prior candidate's OOF); `prior`: the class prior that ships (all
    training rows); `baseline`: (OOF probs, baseline JSON file); `tta_views`: name -> the model's two swap-TTA
    views (original, swapped in its own column order): each model is also a candidate with its views averaged
    in logit space (`formatting.average_views`), so the TTA space is chosen on OOF, not assumed. Each candidate
    carries its complexity (`COMPLEXITY`: + `LOGIT_TTA_STEP` for logit TTA, + `CALIBRATION_STEP` for a
    temperature, the blend above all), the rows' cross-fit splits and, when fitted, its `inner_probs` (the fit
    redone without each split) for `decide_ship`'s nested estimate."""
    labels = np.asarray(labels, dtype=np.int64)
    splits = cross_fit_splits(groups)
    candidates = [
        Candidate(
            name=name,
            kind="model",
            probs=np.asarray(p, dtype=np.float64),
            members=[{"name": name, "kind": "model", "path": str(path), "weight": 1.0}],
        )
        for name, (p, path) in models.items()
    ]
    if baseline is not None:
        candidates.append(
            Candidate(
                name="feature-baseline",
                kind="baseline",
                probs=np.asarray(baseline[0]),
                members=[
                    {"name": "feature-baseline", "kind": "baseline", "path": str(baseline[1]), "weight": 1.0}
                ],
            )
        )
    candidates.append(
        Candidate(
            name="class-prior",
            kind="prior",
            probs=np.asarray(prior_probs, dtype=np.float64),
            members=[
                {"name": "class-prior", "kind": "prior", "prior": [float(v) for v in prior], "weight": 1.0}
            ],
        )
    )
    for name, views in (tta_views or {}).items():
        model = next(c for c in candidates if c.name == name)
        candidates.append(
            Candidate(
                name=f"{name}+logit-tta",
                kind="model",
                probs=average_views(views[0], views[1], "logit"),
                members=[
                    {**m, "name": f"{m['name']}+logit-tta", "source": m["name"], "tta_space": "logit"}
                    for m in model.members
                ],
                complexity=model.complexity + LOGIT_TTA_STEP,
                note="swap-TTA views averaged in logit space (prob space is the plain model)",
            )
        )
    singles = list(candidates)
    if calibrate:
        for single in (c for c in singles if c.kind in ("model", "baseline")):
            fitted = fit_calibration(labels, single.probs, method=CALIBRATION_METHOD)
            candidates.append(
                Candidate(
                    name=f"{single.name}+{CALIBRATION_METHOD}",
                    kind="calibrated",
                    probs=cross_fitted_calibration(labels, single.probs, splits),
                    members=single.members,
                    calibration=fitted.to_dict(),
                    complexity=single.complexity + CALIBRATION_STEP,
                    inner_probs=nested_cross_fit(
                        splits,
                        lambda rows, p=single.probs: cross_fitted_calibration(
                            labels[rows], p[rows], splits[rows]
                        ),
                    ),
                    note=f"{CALIBRATION_METHOD} fitted on all OOF rows; CV cross-fitted over {len(np.unique(splits))} "
                    "prompt-group splits",
                )
            )
    if blend and len(singles) > 1:
        member_probs = {c.name: c.probs for c in singles}
        weights = fit_blend_weights(labels, member_probs).weights
        members = [{**member, "weight": float(weights[c.name])} for c in singles for member in c.members]
        kept = [m for m in members if m["weight"] > 0]
        candidates.append(
            Candidate(
                name="blend",
                kind="blend",
                probs=cross_fitted_blend(labels, member_probs, splits),
                members=kept,
                complexity=max(COMPLEXITY["blend"], *(c.complexity + 1 for c in candidates)),
                inner_probs=nested_cross_fit(
                    splits,
                    lambda rows: cross_fitted_blend(
                        labels[rows], {n: p[rows] for n, p in member_probs.items()}, splits[rows]
                    ),
                ),
                note="weights "
                + ", ".join(f"{m['name']} {m['weight']:.3f}" for m in kept)
                + f"; CV cross-fitted over {len(np.unique(splits))} prompt-group splits",
            )
        )
    for candidate in candidates:
        candidate.cv_log_loss = log_loss(labels, candidate.probs)
        candidate.splits = splits
    return candidates


def _mean_and_se(diff: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of per-row paired differences; an infinite error for a single row."""
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    return float(diff.mean()), se


def paired_lead(labels: np.ndarray, worse: np.ndarray, better: np.ndarray) -> tuple[float, float]:
    """(mean, paired standard error) of `worse`'s per-row log loss minus `better`'s on these rows."""
    return _mean_and_se(row_log_losses(labels, worse) - row_log_losses(labels, better))


def select(labels: np.ndarray, probs: list[np.ndarray], complexity: list[int]) -> tuple[int, int]:
    """The selection rule (`SELECTION_RULE`) on these rows: (index of what ships, index of the lowest CV).
    The lowest CV log loss ships unless a simpler candidate's deficit is within noise of it (at most `NOISE_Z`
    paired standard errors); then the simplest such candidate ships (among equal complexity, the lower CV)."""
    losses = [row_log_losses(labels, p) for p in probs]
    means = [float(loss.mean()) for loss in losses]
    lowest = min(range(len(probs)), key=lambda i: (means[i], complexity[i]))

    def within_noise(index: int) -> bool:
        difference, se = _mean_and_se(losses[index] - losses[lowest])
        return difference <= NOISE_Z * se

    simpler = [i for i in range(len(probs)) if complexity[i] < complexity[lowest] and within_noise(i)]
    return min([lowest, *simpler], key=lambda i: (complexity[i], means[i])), lowest


def decide_ship(
    labels: np.ndarray, candidates: list[Candidate], splits: np.ndarray | None = None
) -> ShipDecision:
    """Rank by CV log loss and ship what `select` chooses on every OOF row. The lowest CV's lead over the
    runner-up is given with its paired standard error. `splits` (default: the candidates' own, as
    `build_candidates` sets them): each row's cross-fit split, for the nested estimate of the shipped CV: for
    each split, `select` chooses on the other splits' rows (`Candidate.selection_probs`: nothing fitted on the
    split), and the choice's probabilities on the split (fitted without it) are scored; the mean over every row
    is `nested_cv_log_loss`, the figure the statement gives as the shipped CV."""
    if not candidates:
        raise UsageError("no candidate to ship")
    labels = np.asarray(labels)
    rows = len(labels)
    ranking = sorted(candidates, key=lambda c: (c.cv_log_loss, c.complexity))
    complexity = [c.complexity for c in ranking]
    chosen, lowest_index = select(labels, [c.probs for c in ranking], complexity)
    shipped, lowest = ranking[chosen], ranking[lowest_index]

    if splits is None:
        splits = next((c.splits for c in candidates if c.splits is not None), None)
    nested, choices = None, []
    if splits is not None:
        splits = np.asarray(splits)
        if splits.shape != (rows,) or len(np.unique(splits)) < 2:
            raise UsageError(
                f"the nested ship estimate needs each of the {rows} OOF rows in one of at least two "
                f"cross-fit splits, got splits of shape {splits.shape}"
            )
        held_out = np.empty(rows, dtype=np.float64)
        for split in np.unique(splits):
            scored = splits == split
            index, _ = select(
                labels[~scored], [c.selection_probs(int(split), splits) for c in ranking], complexity
            )
            choices.append(ranking[index].name)
            held_out[scored] = row_log_losses(labels[scored], ranking[index].probs[scored])
        nested = float(held_out.mean())
    nested_text = (
        ""
        if nested is None
        else (
            f"; nested CV {nested:.4f} (selection made inside each of {len(choices)} splits, scored on the split: chose "
            + ", ".join(f"{name} in {choices.count(name)}" for name in dict.fromkeys(choices))
            + ")"
        )
    )

    if len(ranking) == 1:
        statement = (
            f"ship {shipped.name} ({shipped.kind}): CV log loss {shipped.cv_log_loss:.4f} on {rows} OOF "
            f"rows; {shipped.name} is the only candidate{nested_text}"
        )
        return ShipDecision(ranking, rows, None, None, None, statement, shipped, None, nested, choices)
    second = ranking[1]
    difference, se = paired_lead(labels, second.probs, lowest.probs)
    within = difference <= NOISE_Z * se
    lead = None
    if shipped is lowest:
        statement = (
            f"ship {shipped.name} ({shipped.kind}): CV log loss {shipped.cv_log_loss:.4f} on {rows} OOF "
            f"rows, {difference:.4f} below {second.name} (paired standard error {se:.4f})"
            + ("; the lead is within noise, and no candidate within it is simpler" if within else "")
        )
    else:
        lead = paired_lead(labels, shipped.probs, lowest.probs)
        statement = (
            f"ship {shipped.name} ({shipped.kind}): the simplest candidate within noise of the lowest CV "
            f"({lowest.name} {lowest.cv_log_loss:.4f} on {rows} OOF rows, {lead[0]:.4f} below "
            f"{shipped.name}'s {shipped.cv_log_loss:.4f}, paired standard error {lead[1]:.4f})"
        )
    return ShipDecision(
        ranking, rows, difference, se, bool(within), statement + nested_text, shipped, lead, nested, choices
    )


def write_shipped(
    decision: ShipDecision,
    out_dir: str | Path,
    *,
    class_prior: np.ndarray,
    dialect: str,
    baseline: str | Path | None = None,
) -> Path:
    """What `predict --artifact` takes for the winner, self-contained: it can be moved, uploaded with
    `upload-artifact` and read from /kaggle/input.

    * a plain one-fold model and no `baseline`: that model's own artifact folder (nothing is written);
    * a plain model with a `baseline`: a copy of its artifact at `out_dir` whose manifest also lists the baseline;
    * anything else: an ensemble folder at `out_dir` (`kind: ensemble`; a model trained on several folds ships
      as the fold ensemble its OOF rows came from): each model member's artifact copied under
      `members/<name>/`, a baseline member's JSON file beside it, members named by paths relative to the folder,
      weights, calibration, and `files` listing every file with bytes and sha256
      (`artifacts.check_ensemble_manifest` checks it on upload and load).

    `baseline` (the feature baseline's JSON file, saved with its sha256 manifest) ships as `baseline.json` at
    the top of the folder, where `runtime.find_inputs` looks for the fallback: on Kaggle the rows no model
    serves get the baseline, not the class prior. Files are hard-linked where the file system allows, else
    copied; every copy is checked against its source's sha256. The folder is assembled beside `out_dir` and
    renamed into place, replacing a previous shipped folder. Refused (UsageError, nothing written): an `out_dir`
    that is, contains or lies inside a member or the baseline, or that holds something other than a shipped
    artifact."""
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
SHIPPED_BASELINE = (
    "baseline.json"  # the fallback baseline inside what ships (the name runtime.find_inputs seeks)
)


def _ship_ensemble(
    decision: ShipDecision,
    folder: Path,
    *,
    class_prior: np.ndarray,
    dialect: str,
    baseline: str | Path | None,
) -> None:
    """Copy the winner's members (each source once) and the fallback baseline into `folder`; write its manifest
    naming them relative to it, with every file's bytes and sha256."""
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
    """A model artifact (e.g. a training kernel's `runs/seed<S>/<ordering>/fold<k>/artifact`) copied to
    `out_dir` with the feature baseline inside it as `baseline.json`, so that on Kaggle the rows the model does
    not serve get the baseline, not the class prior. What `python -m kaggle_utils ship` runs; upload the result
    with `kaggle upload-artifact OUT_DIR`.

    The artifact is checked (its copy against every listed sha256) and left untouched; `out_dir` is refused when it is,
    contains or lies inside the artifact or the baseline, or holds something other than a shipped artifact."""
    artifact_dir, out_dir, baseline = Path(artifact_dir), Path(out_dir), Path(baseline)
    check_output_apart(out_dir, [("artifact", artifact_dir), ("fallback baseline", baseline)])
    if not baseline.is_file():
        raise UsageError(
            f"fallback baseline {baseline} not found: save one with `baseline --save-model FILE`"
        )
    BaselineModel.load(
        baseline
    )  # its sha256 manifest checked: a damaged baseline is refused here, not on Kaggle
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
    """The files a model artifact's manifest lists, and the manifest, into `folder/relative`; the copy must be a
    complete artifact matching every sha256 (`read_manifest`). Returns its files table, paths from `folder`."""
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
    """One trained (variant, seed) as a ship candidate: OOF rows (ids in order), each row's training-part class
    prior, and the artifact of every fold that produced them (several folds ship as a fold ensemble)."""

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
    """Rank the runs' shipped models, the baseline (`baseline`: (id -> OOF probs, model file)), the class prior,
    their calibrated versions and the blend on the runs' common OOF rows; write what ships under `out_dir`
    (`shipped/` for an ensemble folder), the decision as `ship.json` and `reliability.png` (the best model
    before and after calibration). Returns the decision and the path `predict --artifact` takes."""
    out_dir = Path(out_dir)
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
    labels, groups = first.labels, np.array([groups_by_id[row_id] for row_id in first.ids])
    baseline_oof = None
    if baseline is not None:
        by_id, model_path = baseline
        missing = [row_id for row_id in first.ids if row_id not in by_id]
        if missing:
            raise UsageError(
                f"the baseline OOF lacks {len(missing)} of the runs' rows (e.g. {missing[:5]}): "
                "make it on the same folds file"
            )
        baseline_oof = (np.stack([by_id[row_id] for row_id in first.ids]), model_path)
    candidates = build_candidates(
        labels,
        groups,
        {name: (p, "") for name, (p, _) in models.items()},
        prior_probs=first.row_priors,
        prior=prior,
        baseline=baseline_oof,
        tta_views=tta_views,
    )
    for candidate in candidates:  # a model's members: its fold artifacts, equal weights (a fold ensemble)
        candidate.members = [member for m in candidate.members for member in _fold_members(m, models)]
    decision = decide_ship(labels, candidates)
    best_model = min((c for c in candidates if c.kind == "model"), key=lambda c: c.cv_log_loss)
    calibrated = next((c for c in candidates if c.name == f"{best_model.name}+{CALIBRATION_METHOD}"), None)
    curves = {f"{best_model.name} (raw)": best_model.probs}
    if calibrated is not None:
        curves[f"{calibrated.name} (cross-fitted)"] = calibrated.probs
    plot_reliability(labels, curves, out_dir / "reliability.png")
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
