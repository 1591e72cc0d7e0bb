"""One scoring path: cross-validation scores the shipped artifact with the functions `predict` uses, so a
change to how predictions are made or combined moves the CV figure and the submission together."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest
import torch

from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.core.metrics import load_oof, oof_probs
from kaggle_utils.inference import predictor as inference
from kaggle_utils.inference import views as inference_views
from kaggle_utils.inference.report import InferenceError
from kaggle_utils.inference.scoring import score_rows
from kaggle_utils.studies import experiment
from kaggle_utils.studies import orderings as compare

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # conftest.py


def _sharpen(original_combine):
    """A stand-in for a later post-processing step (e.g. calibration): squares and renormalises the combined
    probabilities. Big enough that CV and the submission visibly disagree unless both go through it."""

    def combine(views, fallback, tta_space="prob"):
        probs, paths = original_combine(views, fallback, tta_space)
        sharpened = probs**2
        return sharpened / sharpened.sum(axis=1, keepdims=True), paths

    return combine


def test_cv_and_predict_share_the_view_combination(sample_files, tmp_path, monkeypatch):
    monkeypatch.setattr(inference_views, "combine_views", _sharpen(inference_views.combine_views))
    cfg = experiment.demo_config()
    cfg.folds.n_folds = 4
    cfg.lora.r = 4
    cfg.train = dataclasses.replace(
        cfg.train, max_steps=2, eval_every_steps=2, save_every_steps=2, cv_folds=(0,)
    )
    # A token budget unlike the training-time evaluation's: CV must batch as inference does, not as training.
    cfg.inference = dataclasses.replace(
        cfg.inference, token_budget=1024, max_rows_per_batch=3, progress=False
    )
    out = tmp_path / "run"
    report = compare.compare_orderings(
        cfg, sample_files.train_csv, out, variants=["ft-then-quant"], progress=False
    )
    artifact = report.run("ft-then-quant").folds[0].artifact_dir
    oof = load_oof(out / compare.OOF_FILE).filter(pl.col("name") == "ft-then-quant/seed42/quantized")

    held_out = pl.read_csv(sample_files.train_csv).filter(pl.col("id").is_in(oof["id"].to_list()))
    test_csv = tmp_path / "test.csv"
    held_out.select("id", "prompt", "response_a", "response_b").write_csv(test_csv)
    submission_path = tmp_path / "submission.csv"
    predict_cfg = InferenceConfig(token_budget=1024, max_rows_per_batch=3, progress=False, device="cpu")
    result = inference.predict(artifact, test_csv, submission_path, predict_cfg)
    assert result.fallback_rows == 0

    submitted = pl.read_csv(submission_path)
    by_id = dict(
        zip(
            submitted["id"].cast(pl.String).to_list(),
            submitted.select("winner_model_a", "winner_model_b", "winner_tie").to_numpy(),
            strict=True,
        )
    )
    predicted = np.stack([by_id[str(row_id)] for row_id in oof["id"].to_list()])
    np.testing.assert_allclose(oof_probs(oof), predicted, atol=1e-5)


def test_score_rows_refuses_to_leave_a_row_unscored(train_data, demo_tokenizer):
    from kaggle_utils.core.config import FormatConfig

    class Broken(torch.nn.Module):
        """A model whose every forward fails: predict would fall back, CV must not."""

        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def forward(self, **_):
            raise RuntimeError("device lost")

    rows = train_data.frame.head(4)
    with pytest.raises(InferenceError, match="4 of 4 rows unpredicted.*device lost"):
        score_rows(
            Broken(),
            demo_tokenizer,
            FormatConfig(max_length=128),
            rows,
            InferenceConfig(progress=False, max_consecutive_failures=1),
        )
