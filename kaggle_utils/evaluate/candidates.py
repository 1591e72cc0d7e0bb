"""The ship decision: every candidate scored on the same OOF rows, and the rule that chooses what ships.

Candidates: each trained model (and its logit-space swap TTA), the feature baseline, the class prior, each
calibrated, and their blend. Anything fitted on OOF rows is scored cross-fitted over prompt-group splits.
`decide_ship(labels, build_candidates(...))` ships the lowest CV unless a simpler candidate is within noise,
and reports the choice's nested CV. Why: docs/DESIGN_NOTES.md, "evaluate/candidates.py".
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.model_selection import GroupKFold

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import log_loss, row_log_losses
from kaggle_utils.evaluate.calibration import apply_calibration, fit_calibration
from kaggle_utils.evaluate.ensembles import blend_members, fit_blend_weights
from kaggle_utils.text.swap import average_views

CROSS_FIT_SPLITS = 5
NOISE_Z = 2.0  # a lead counts when it exceeds this many paired standard errors (as compare's decision)
CALIBRATION_METHOD = "temperature"
# How complex a candidate is, for "ship the simplest within noise": the class prior fits nothing; a trained
# model (or the feature baseline) is as trained; + logit-space TTA fixes how its two views are averaged;
# + temperature fits a parameter on OOF rows; a blend fits weights over several.
COMPLEXITY = {"prior": 0, "model": 1, "baseline": 1, "calibrated": 3, "blend": 5}
LOGIT_TTA_STEP = 1  # added to the complexity of the candidate it is made from
CALIBRATION_STEP = 2

SELECTION_RULE = (
    f"the lowest CV log loss, unless a simpler candidate is within {NOISE_Z:g} paired standard "
    "errors of it: then the simplest such one (class prior < single model < + logit-space TTA < "
    "+ temperature < blend; among equals the lower CV)"
)


@dataclass
class Candidate:
    """One thing that could be shipped: its OOF probabilities on the common rows (cross-fitted when fitted on
    OOF rows) and the ensemble members that build it. `inner_probs[k]`: its probabilities outside split k,
    fitted without split k (None when nothing is fitted on OOF rows)."""

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
    """The ranked candidates (lowest CV first), what ships (`best`) and why. `lead_over_shipped`: the lowest
    CV's (difference, paired standard error) over what ships when a simpler one ships; `nested_cv_log_loss`:
    the shipped CV with the choice made inside each cross-fit split (None without splits)."""

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
    """Each split's rows calibrated by what was fitted on the other splits (a lone split: on its own rows)."""
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
    """Each split's rows blended with weights fitted on the other splits (a lone split: on its own rows)."""
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
    """For each split k, `cross_fitted(mask of the rows outside k)`: a fitted candidate's probabilities for
    choosing inside split k, none fitted on split k's labels (`Candidate.inner_probs`)."""
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
    """Every candidate on the same rows, with its cross-fitted CV log loss and the rows' cross-fit splits.

    `models`: name -> (OOF probs, artifact folder); `prior_probs`: each row's training-part class prior;
    `prior`: the class prior that ships; `baseline`: (OOF probs, baseline JSON file); `tta_views`: name -> the
    model's two swap-TTA views, each then also a candidate averaged in logit space."""
    labels = np.asarray(labels, dtype=np.int64)
    splits = cross_fit_splits(groups)
    candidates = _single_candidates(models, prior_probs, prior, baseline)
    candidates += [_logit_tta_candidate(candidates, name, views) for name, views in (tta_views or {}).items()]
    singles = list(candidates)
    if calibrate:
        candidates += [
            _calibrated_candidate(labels, single, splits)
            for single in singles
            if single.kind in ("model", "baseline")
        ]
    if blend and len(singles) > 1:
        candidates.append(_blend_candidate(labels, singles, splits, candidates))
    for candidate in candidates:
        candidate.cv_log_loss = log_loss(labels, candidate.probs)
        candidate.splits = splits
    return candidates


def _single_candidates(
    models: dict[str, tuple[np.ndarray, str | Path]],
    prior_probs: np.ndarray,
    prior: np.ndarray,
    baseline: tuple[np.ndarray, str | Path] | None,
) -> list[Candidate]:
    """The trained models, the feature baseline and the class prior, each as it is (nothing fitted on OOF)."""
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
        member = {"name": "feature-baseline", "kind": "baseline", "path": str(baseline[1]), "weight": 1.0}
        candidates.append(
            Candidate(
                name="feature-baseline", kind="baseline", probs=np.asarray(baseline[0]), members=[member]
            )
        )
    member = {"name": "class-prior", "kind": "prior", "prior": [float(v) for v in prior], "weight": 1.0}
    candidates.append(
        Candidate(
            name="class-prior",
            kind="prior",
            probs=np.asarray(prior_probs, dtype=np.float64),
            members=[member],
        )
    )
    return candidates


def _logit_tta_candidate(candidates: list[Candidate], name: str, views: np.ndarray) -> Candidate:
    """Model `name` with its two swap-TTA views averaged in logit space (its plain form averages probs)."""
    model = next(c for c in candidates if c.name == name)
    return Candidate(
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


def _calibrated_candidate(labels: np.ndarray, single: Candidate, splits: np.ndarray) -> Candidate:
    """`single` calibrated: fitted on every OOF row to ship, scored cross-fitted."""
    fitted = fit_calibration(labels, single.probs, method=CALIBRATION_METHOD)
    return Candidate(
        name=f"{single.name}+{CALIBRATION_METHOD}",
        kind="calibrated",
        probs=cross_fitted_calibration(labels, single.probs, splits),
        members=single.members,
        calibration=fitted.to_dict(),
        complexity=single.complexity + CALIBRATION_STEP,
        inner_probs=nested_cross_fit(
            splits,
            lambda rows: cross_fitted_calibration(labels[rows], single.probs[rows], splits[rows]),
        ),
        note=f"{CALIBRATION_METHOD} fitted on all OOF rows; CV cross-fitted over "
        f"{len(np.unique(splits))} prompt-group splits",
    )


def _blend_candidate(
    labels: np.ndarray, singles: list[Candidate], splits: np.ndarray, candidates: list[Candidate]
) -> Candidate:
    """The blend of `singles`: weights fitted on every OOF row to ship, scored cross-fitted; more complex than
    every candidate in `candidates`."""
    member_probs = {c.name: c.probs for c in singles}
    weights = fit_blend_weights(labels, member_probs).weights
    members = [{**member, "weight": float(weights[c.name])} for c in singles for member in c.members]
    kept = [m for m in members if m["weight"] > 0]
    return Candidate(
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


def _mean_and_se(diff: np.ndarray) -> tuple[float, float]:
    """(mean, standard error) of per-row paired differences; an infinite error for a single row."""
    se = float(diff.std(ddof=1) / math.sqrt(len(diff))) if len(diff) > 1 else math.inf
    return float(diff.mean()), se


def paired_lead(labels: np.ndarray, worse: np.ndarray, better: np.ndarray) -> tuple[float, float]:
    """(mean, paired standard error) of `worse`'s per-row log loss minus `better`'s on these rows."""
    return _mean_and_se(row_log_losses(labels, worse) - row_log_losses(labels, better))


def select(labels: np.ndarray, probs: list[np.ndarray], complexity: list[int]) -> tuple[int, int]:
    """The selection rule (`SELECTION_RULE`) on these rows: (index of what ships, index of the lowest CV)."""
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
    """Rank by CV log loss and ship what `select` chooses on every OOF row, with the nested CV of that choice.

    `splits` (default: the candidates' own, as `build_candidates` sets them): each row's cross-fit split."""
    if not candidates:
        raise UsageError("no candidate to ship")
    labels = np.asarray(labels)
    rows = len(labels)
    ranking = sorted(candidates, key=lambda c: (c.cv_log_loss, c.complexity))
    chosen, lowest_index = select(labels, [c.probs for c in ranking], [c.complexity for c in ranking])
    shipped, lowest = ranking[chosen], ranking[lowest_index]
    if splits is None:
        splits = next((c.splits for c in candidates if c.splits is not None), None)
    nested, choices = (None, []) if splits is None else _nested_choice(labels, ranking, np.asarray(splits))
    nested_text = "" if nested is None else _nested_text(nested, choices)
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


def _nested_choice(
    labels: np.ndarray, ranking: list[Candidate], splits: np.ndarray
) -> tuple[float, list[str]]:
    """(nested CV log loss, the choice in each split): `select` chooses on the other splits' rows, and the
    choice's probabilities on the split (fitted without it) are scored."""
    rows = len(labels)
    if splits.shape != (rows,) or len(np.unique(splits)) < 2:
        raise UsageError(
            f"the nested ship estimate needs each of the {rows} OOF rows in one of at least two "
            f"cross-fit splits, got splits of shape {splits.shape}"
        )
    complexity = [c.complexity for c in ranking]
    choices: list[str] = []
    held_out = np.empty(rows, dtype=np.float64)
    for split in np.unique(splits):
        scored = splits == split
        index, _ = select(
            labels[~scored], [c.selection_probs(int(split), splits) for c in ranking], complexity
        )
        choices.append(ranking[index].name)
        held_out[scored] = row_log_losses(labels[scored], ranking[index].probs[scored])
    return float(held_out.mean()), choices


def _nested_text(nested: float, choices: list[str]) -> str:
    """The statement's nested-CV clause."""
    chose = ", ".join(f"{name} in {choices.count(name)}" for name in dict.fromkeys(choices))
    return (
        f"; nested CV {nested:.4f} (selection made inside each of {len(choices)} splits, "
        f"scored on the split: chose {chose})"
    )
