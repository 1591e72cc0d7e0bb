"""The ship decision: every candidate on the same rows, fitted things scored cross-fitted, the best shipped as
something `predict` runs, and the CV figure is what `predict` then does."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_inference import build_tiny_artifacts, predict_cfg, read_probs

from kaggle_utils import inference
from kaggle_utils.calibration import apply_calibration, fit_calibration
from kaggle_utils.metrics import log_loss
from kaggle_utils.ship import build_candidates, cross_fit_splits, decide_ship, write_shipped

PRIOR = np.array([0.35, 0.34, 0.31])


def data(n: int = 600, temperature: float = 3.0, signal: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, signal, size=(n, 3))
    true = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    labels = np.array([rng.choice(3, p=row) for row in true])
    sharp = np.exp(logits * temperature)
    groups = rng.integers(0, n // 3, size=n)  # prompts shared by ~3 rows
    return labels, sharp / sharp.sum(axis=1, keepdims=True), true, groups


def test_splits_keep_prompt_groups_together():
    groups = np.repeat(np.arange(50), 3)
    splits = cross_fit_splits(groups)
    for group in range(50):
        assert len(set(splits[groups == group])) == 1
    assert len(set(splits)) == 5


def test_an_over_confident_model_ships_calibrated_and_the_figure_is_cross_fitted():
    labels, sharp, true, groups = data()
    candidates = build_candidates(labels, groups, {"model": (sharp, "art/model")},
                                  prior_probs=np.tile(PRIOR, (len(labels), 1)), prior=PRIOR)
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
    labels, _, _, groups = data(n=120, seed=3)
    rng = np.random.default_rng(4)
    useless = rng.dirichlet(np.full(3, 0.5), size=len(labels))  # a confident model that learned nothing
    candidates = build_candidates(labels, groups, {"model": (useless, "art/model")},
                                  prior_probs=np.tile(PRIOR, (len(labels), 1)), prior=PRIOR, blend=False)
    decision = decide_ship(labels, candidates)
    assert decision.best.name in ("class-prior", "model+temperature")
    assert decision.ranking[-1].name == "model"
    assert decision.best.cv_log_loss < log_loss(labels, useless)


def test_the_shipped_calibrated_model_predicts_what_its_cv_scored(tmp_path, demo_tokenizer, sample_files):
    """Ship a calibrated model as an ensemble folder; predict on the test file gives exactly the calibrated
    version of the plain model's predictions (the post-processing CV scored is the one predict applies)."""
    torch.set_num_threads(1)
    artifacts = build_tiny_artifacts(tmp_path / "artifacts", demo_tokenizer)
    labels, sharp, _, groups = data(n=300)
    candidates = build_candidates(labels, groups, {"ftq": (sharp, artifacts["ft-then-quant"])},
                                  prior_probs=np.tile(PRIOR, (len(labels), 1)), prior=PRIOR, blend=False)
    decision = decide_ship(labels, [c for c in candidates if c.kind == "calibrated"])
    shipped = write_shipped(decision, tmp_path / "shipped", class_prior=PRIOR, dialect="lmsys")
    manifest = json.loads((shipped / "manifest.json").read_text())
    assert manifest["kind"] == "ensemble" and manifest["calibration"]["method"] == "temperature"

    plain = tmp_path / "plain.csv"
    inference.predict(artifacts["ft-then-quant"], sample_files.test_csv, plain, predict_cfg())
    out = tmp_path / "submission.csv"
    report = inference.predict(shipped, sample_files.test_csv, out, predict_cfg())
    assert report.fallback_rows == 0
    np.testing.assert_allclose(read_probs(out), apply_calibration(read_probs(plain), manifest["calibration"]),
                               atol=1e-6)


def test_a_plain_model_ships_as_its_own_artifact(tmp_path):
    labels, _, true, groups = data(n=200)
    candidates = build_candidates(labels, groups, {"m": (true, tmp_path / "m")},
                                  prior_probs=np.tile(PRIOR, (len(labels), 1)), prior=PRIOR,
                                  calibrate=False, blend=False)
    decision = decide_ship(labels, candidates)
    assert decision.best.name == "m"
    assert write_shipped(decision, tmp_path / "out", class_prior=PRIOR, dialect="lmsys") == tmp_path / "m"


def test_tta_space_is_a_candidate_and_ships_through_the_ensemble_member(tmp_path, demo_tokenizer, sample_files):
    """The logit-space TTA candidate is scored on the views' OOF; shipped, predict combines the member's views
    in logit space, exactly as its manifest saying tta_space=logit would."""
    torch.set_num_threads(1)
    artifacts = build_tiny_artifacts(tmp_path / "artifacts", demo_tokenizer)
    labels, sharp, _, groups = data(n=300)
    swapped_view = sharp[:, [1, 0, 2]] ** 0.5
    swapped_view /= swapped_view.sum(axis=1, keepdims=True)
    views = np.stack([sharp, swapped_view])
    candidates = build_candidates(labels, groups, {"ftq": (sharp, artifacts["ft-then-quant"])},
                                  prior_probs=np.tile(PRIOR, (len(labels), 1)), prior=PRIOR, calibrate=False,
                                  blend=False, tta_views={"ftq": views})
    logit = next(c for c in candidates if c.name == "ftq+logit-tta")
    decision = decide_ship(labels, [logit])
    shipped = write_shipped(decision, tmp_path / "shipped", class_prior=PRIOR, dialect="lmsys")
    assert shipped != artifacts["ft-then-quant"]  # not the plain artifact: its manifest says prob space

    reference = tmp_path / "reference"
    import shutil

    shutil.copytree(artifacts["ft-then-quant"], reference)
    manifest_path = reference / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "tta_space": "logit"}))
    inference.predict(reference, sample_files.test_csv, tmp_path / "logit.csv", predict_cfg())
    inference.predict(artifacts["ft-then-quant"], sample_files.test_csv, tmp_path / "prob.csv", predict_cfg())
    inference.predict(shipped, sample_files.test_csv, tmp_path / "shipped.csv", predict_cfg())
    np.testing.assert_allclose(read_probs(tmp_path / "shipped.csv"), read_probs(tmp_path / "logit.csv"), atol=1e-6)
    assert not np.allclose(read_probs(tmp_path / "logit.csv"), read_probs(tmp_path / "prob.csv"), atol=1e-4)


def test_a_blend_of_plain_and_logit_tta_members_is_a_valid_ensemble(tmp_path):
    """Both TTA spaces of one model in a blend: distinct member names (predict keys members by name)."""
    labels, sharp, _, groups = data(n=300)
    views = np.stack([sharp, sharp[:, [1, 0, 2]] ** 0.5 / (sharp[:, [1, 0, 2]] ** 0.5).sum(axis=1, keepdims=True)])
    candidates = build_candidates(labels, groups, {"m": (sharp, tmp_path / "m")},
                                  prior_probs=np.tile(PRIOR, (len(labels), 1)), prior=PRIOR, calibrate=False,
                                  tta_views={"m": views})
    blend = next(c for c in candidates if c.name == "blend")
    shipped = write_shipped(decide_ship(labels, [blend]), tmp_path / "shipped", class_prior=PRIOR, dialect="lmsys")
    manifest = json.loads((shipped / "manifest.json").read_text())
    members = inference.ensemble_members(shipped, manifest)  # raises on repeated names
    assert len({m.name for m in members}) == len(members)


def test_seed_ensemble_averages_aligned_rows_and_ships_every_seed():
    from kaggle_utils.ship import ShippedRun, seed_ensemble

    labels = np.array([0, 1, 2])
    a = ShippedRun("v", [1, 2, 3], labels, np.array([[0.6, 0.2, 0.2], [0.2, 0.6, 0.2], [0.2, 0.2, 0.6]]),
                   np.tile(PRIOR, (3, 1)), ["s1/fold0"])
    b = ShippedRun("v", [3, 1, 2], labels[[2, 0, 1]], np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]),
                   np.tile(PRIOR, (3, 1)), ["s2/fold0"])
    both = seed_ensemble([a, b], "v/seed-ensemble")
    np.testing.assert_allclose(both.probs[0], [0.8, 0.1, 0.1])  # id 1 in both, rows matched by id
    assert both.artifact_dirs == ["s1/fold0", "s2/fold0"] and both.ids == [1, 2, 3]
