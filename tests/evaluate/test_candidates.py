"""Ship candidates: every candidate on the same rows, fitted things scored cross-fitted, the selection rule
and its nested CV."""

from __future__ import annotations

import numpy as np
import pytest
from builders import CLASS_PRIOR, overconfident_rows

from kaggle_utils.core.metrics import log_loss
from kaggle_utils.evaluate.calibration import fit_calibration
from kaggle_utils.evaluate.candidates import Candidate, build_candidates, cross_fit_splits, decide_ship

PRIOR = np.array(CLASS_PRIOR)


def test_splits_keep_prompt_groups_together():
    groups = np.repeat(np.arange(50), 3)
    splits = cross_fit_splits(groups)
    for group in range(50):
        assert len(set(splits[groups == group])) == 1
    assert len(set(splits)) == 5


def test_an_over_confident_model_ships_calibrated_and_the_figure_is_cross_fitted():
    labels, sharp, true, groups = overconfident_rows()
    candidates = build_candidates(
        labels,
        groups,
        {"model": (sharp, "art/model")},
        prior_probs=np.tile(PRIOR, (len(labels), 1)),
        prior=PRIOR,
    )
    by_name = {c.name: c for c in candidates}
    assert set(by_name) == {"model", "class-prior", "model+temperature", "blend"}
    decision = decide_ship(labels, candidates)
    assert decision.best.name in ("model+temperature", "blend")
    calibrated = by_name["model+temperature"]
    in_sample = fit_calibration(labels, sharp).log_loss_after
    assert calibrated.cv_log_loss > in_sample  # scored on rows the fit did not see: not the in-sample figure
    assert calibrated.cv_log_loss < by_name["model"].cv_log_loss - 0.1
    assert calibrated.calibration["temperature"] == pytest.approx(3.0, rel=0.2)
    assert "ship " + decision.best.name in decision.statement


def test_small_data_can_make_the_class_prior_the_best_thing_to_ship():
    labels, _, _, groups = overconfident_rows(n=120, seed=3)
    rng = np.random.default_rng(4)
    useless = rng.dirichlet(np.full(3, 0.5), size=len(labels))  # a confident model that learned nothing
    candidates = build_candidates(
        labels,
        groups,
        {"model": (useless, "art/model")},
        prior_probs=np.tile(PRIOR, (len(labels), 1)),
        prior=PRIOR,
        blend=False,
    )
    decision = decide_ship(labels, candidates)
    assert decision.best.name in ("class-prior", "model+temperature")
    assert decision.ranking[-1].name == "model"
    assert decision.best.cv_log_loss < log_loss(labels, useless)


def noisy_copies(true: np.ndarray, count: int, noise: float, seed: int) -> list[np.ndarray]:
    """`count` predictions that are the true probabilities with independent logit noise: equally good in
    expectation, so any lead among them on a set of rows is luck."""
    rng = np.random.default_rng(seed)
    copies = []
    for _ in range(count):
        logits = np.log(true) + rng.normal(0.0, noise, size=true.shape)
        copies.append(np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True))
    return copies


def test_choosing_among_equally_good_candidates_on_the_same_rows_is_optimistic_and_the_nested_cv_is_not():
    """Twelve candidates that differ only by noise: the lowest same-row CV is a best-of-12 (below every
    candidate's expected loss); the nested figure chooses inside each split on the other splits' rows and
    scores the choice on the held-out split, so it is not below what the candidates do on average."""

    labels, _, true, groups = overconfident_rows(n=300, seed=5)
    splits = cross_fit_splits(groups)
    candidates = [
        Candidate(name=f"m{index}", kind="model", probs=probs, members=[])
        for index, probs in enumerate(noisy_copies(true, 12, noise=0.6, seed=6))
    ]
    for candidate in candidates:
        candidate.cv_log_loss = log_loss(labels, candidate.probs)
    decision = decide_ship(labels, candidates, splits=splits)
    same_row_best = decision.ranking[0].cv_log_loss
    average = float(np.mean([c.cv_log_loss for c in candidates]))
    assert same_row_best < average - 0.01  # the winner's curse, on these rows
    assert decision.nested_cv_log_loss > same_row_best
    assert decision.nested_cv_log_loss > average - 0.01
    assert len(decision.nested_choices) == len(set(splits))
    record = decision.to_dict()
    assert record["nested_cv_log_loss"] == decision.nested_cv_log_loss
    assert (
        f"nested CV {decision.nested_cv_log_loss:.4f} (selection made inside each of 5 splits"
        in decision.statement
    )


def test_a_lead_within_noise_ships_the_simplest_candidate_and_says_so():
    """Two equally good predictions, the lower one on these rows made a blend: its lead is noise, so the
    simpler single model ships; the report still names the lowest CV and the lead over what shipped."""

    labels, _, true, groups = overconfident_rows(n=400, seed=7)
    first, second = noisy_copies(true, 2, noise=0.4, seed=8)
    if log_loss(labels, first) > log_loss(labels, second):
        first, second = second, first
    candidates = [
        Candidate(name="blend", kind="blend", probs=first, members=[]),
        Candidate(name="model", kind="model", probs=second, members=[]),
    ]
    for candidate in candidates:
        candidate.cv_log_loss = log_loss(labels, candidate.probs)
    decision = decide_ship(labels, candidates, splits=cross_fit_splits(groups))
    assert decision.ranking[0].name == "blend" and decision.within_noise is True
    assert decision.best.name == "model"
    record = decision.to_dict()
    assert record["shipped"] == "model" and record["lowest_cv"] == "blend"
    lead = record["lead_over_shipped"]
    assert 0 < lead["difference"] <= 2.0 * lead["standard_error"]
    assert decision.statement.startswith(
        "ship model (model): the simplest candidate within noise of the lowest CV "
        f"(blend {candidates[0].cv_log_loss:.4f} on 400 OOF rows"
    )


def test_a_clear_lead_ships_the_best_and_its_nested_cv_is_its_held_out_score():
    """A well-calibrated prediction against the same one three times too sharp: the lead is far beyond noise,
    the blend ships although it is the most complex, every split chooses it, and as nothing in it was fitted
    on OOF rows its nested CV is its own CV."""

    labels, sharp, true, groups = overconfident_rows(n=400, seed=9)
    candidates = [
        Candidate(name="blend", kind="blend", probs=true, members=[]),
        Candidate(name="model", kind="model", probs=sharp, members=[]),
        Candidate(name="class-prior", kind="prior", probs=np.tile(PRIOR, (len(labels), 1)), members=[]),
    ]
    for candidate in candidates:
        candidate.cv_log_loss = log_loss(labels, candidate.probs)
    decision = decide_ship(labels, candidates, splits=cross_fit_splits(groups))
    assert decision.best.name == "blend" and decision.within_noise is False
    assert decision.to_dict()["lead_over_shipped"] is None
    assert set(decision.nested_choices) == {"blend"}
    assert decision.nested_cv_log_loss == pytest.approx(candidates[0].cv_log_loss, abs=1e-12)
    assert "simplest" not in decision.statement


def test_the_choice_inside_a_split_never_sees_that_splits_labels():
    """Nested selection through build_candidates: every candidate's rows for choosing inside split 0 (a
    temperature and blend weights fitted there without split 0) are the same whatever split 0's labels are."""
    labels, sharp, _, groups = overconfident_rows(n=300, seed=11)
    splits = cross_fit_splits(groups)
    shuffled = labels.copy()
    held = np.flatnonzero(splits == 0)
    shuffled[held] = (labels[held] + 1) % 3
    built = [
        build_candidates(
            y,
            groups,
            {"model": (sharp, "art/model")},
            prior_probs=np.tile(PRIOR, (len(labels), 1)),
            prior=PRIOR,
        )
        for y in (labels, shuffled)
    ]
    for before, after in zip(*built, strict=True):
        assert before.name == after.name
        np.testing.assert_allclose(before.selection_probs(0), after.selection_probs(0), atol=1e-12)
    decisions = [decide_ship(y, candidates) for y, candidates in zip((labels, shuffled), built, strict=True)]
    assert decisions[0].nested_choices[0] == decisions[1].nested_choices[0]
    assert decisions[0].to_dict()["splits"] == 5


def test_one_candidate_has_its_own_cross_fitted_cv_as_its_nested_cv():
    labels, sharp, _, groups = overconfident_rows(n=300, seed=12)
    candidates = build_candidates(
        labels,
        groups,
        {"model": (sharp, "art/model")},
        prior_probs=np.tile(PRIOR, (len(labels), 1)),
        prior=PRIOR,
        blend=False,
    )
    calibrated = next(c for c in candidates if c.kind == "calibrated")
    decision = decide_ship(labels, [calibrated])
    assert decision.nested_cv_log_loss == pytest.approx(calibrated.cv_log_loss, abs=1e-12)
    assert "is the only candidate" in decision.statement
