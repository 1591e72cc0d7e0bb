"""QiD: exactly the difference of the two competition log losses; the D^beta fit and its bootstrap
interval."""

from __future__ import annotations

import numpy as np
import pytest

from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import log_loss
from kaggle_utils.studies.qid import checkpoint_steps
from kaggle_utils.studies.qid_fit import PAPER_BETA, bootstrap_fit, bootstrap_trend, fit_log_log, qid


def random_probs(rng, n):
    raw = rng.random((n, 3)) + 0.05
    return raw / raw.sum(axis=1, keepdims=True)


def test_qid_is_exactly_the_difference_of_the_two_log_losses():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, 200)
    p16, pq = random_probs(rng, 200), random_probs(rng, 200)
    pq[0] = [1.0, 0.0, 0.0]  # exercises the eps clipping of the competition metric
    assert qid(labels, p16, pq) == log_loss(labels, pq) - log_loss(labels, p16)
    assert qid(labels, p16, p16) == 0.0


def test_fit_recovers_a_known_exponent_and_refuses_non_positive_qid():
    tokens = np.array([1e3, 3e3, 1e4, 3e4, 1e5])
    beta, intercept = fit_log_log(tokens, 0.002 * tokens**0.53)
    assert beta == pytest.approx(0.53, abs=1e-9)
    assert intercept == pytest.approx(np.log(0.002), abs=1e-9)
    assert fit_log_log(tokens, np.array([0.1, 0.2, -0.01, 0.3, 0.4])) is None


def _synthetic_checkpoints(beta, scale, n_rows=400, noise=0.0, seed=0):
    """16-bit and quantized probabilities whose per-row loss gap averages scale * D^beta per checkpoint."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n_rows)
    tokens = np.geomspace(1e3, 1e5, 6)
    p16 = np.full((len(tokens), n_rows, 3), 1 / 3)
    pq = np.empty_like(p16)
    for k, d in enumerate(tokens):
        gap = scale * d**beta + noise * rng.standard_normal(n_rows)
        picked = np.clip(np.exp(-(np.log(3) + gap)), 1e-6, 0.98)  # loss of the true class rises by `gap`
        pq[k] = ((1 - picked) / 2)[:, None]
        pq[k, np.arange(n_rows), labels] = picked
    return labels, tokens, p16, pq


def test_bootstrap_interval_covers_the_true_exponent():
    labels, tokens, p16, pq = _synthetic_checkpoints(PAPER_BETA, 2e-4, noise=0.01)
    fit = bootstrap_fit(labels, tokens, p16, pq, n_bootstrap=300)
    assert fit.identifiable and fit.identifiable_share == 1.0
    assert fit.ci_low < PAPER_BETA < fit.ci_high
    assert fit.ci_high - fit.ci_low < 0.2


def test_qid_within_noise_is_reported_not_identifiable():
    labels, tokens, p16, pq = _synthetic_checkpoints(0.0, 0.0, noise=0.05, seed=3)
    fit = bootstrap_fit(labels, tokens, p16, pq, n_bootstrap=200)
    assert not fit.identifiable
    assert "not identifiable" in fit.describe()


def test_trend_is_positive_for_growing_qid_and_straddles_zero_for_noise():
    labels, tokens, p16, pq = _synthetic_checkpoints(PAPER_BETA, 2e-4, noise=0.01)
    growing = bootstrap_trend(labels, tokens, p16, pq, n_bootstrap=300)
    assert growing.slope_ci[0] > 0 and growing.mean_qid_ci[0] > 0
    labels, tokens, p16, pq = _synthetic_checkpoints(0.0, 0.0, noise=0.05, seed=3)
    flat = bootstrap_trend(labels, tokens, p16, pq, n_bootstrap=300)
    assert flat.slope_ci[0] < 0 < flat.slope_ci[1]


def test_training_seeds_are_resampled_so_seed_disagreement_widens_the_interval():
    """Three seeds whose QiD trends disagree: rows alone look certain, resampling seeds does not."""
    rng = np.random.default_rng(5)
    n_rows, decades = 300, np.array([3.0, 4.0, 5.0])
    labels = rng.integers(0, 3, n_rows)
    tokens, groups, p16, pq = [], [], [], []
    for seed, slope in enumerate((0.01, 0.012, -0.03)):
        for decade in decades:
            gap = 0.05 + slope * (decade - 4) + 0.001 * rng.standard_normal(n_rows)
            picked = np.exp(-(np.log(3) + gap))
            quantized = np.repeat(((1 - picked) / 2)[:, None], 3, axis=1)
            quantized[np.arange(n_rows), labels] = picked
            tokens.append(10**decade)
            groups.append(seed)
            p16.append(np.full((n_rows, 3), 1 / 3))
            pq.append(quantized)
    args = (labels, np.array(tokens), np.stack(p16), np.stack(pq))
    rows_only = bootstrap_trend(*args, n_bootstrap=300)
    with_seeds = bootstrap_trend(*args, n_bootstrap=300, groups=np.array(groups))
    assert rows_only.slope_ci[1] < 0  # rows alone: a confident (spurious) negative trend
    assert with_seeds.slope_ci[0] < 0 < with_seeds.slope_ci[1]
    assert with_seeds.slope_per_decade == pytest.approx(rows_only.slope_per_decade)


def test_checkpoint_steps_are_geometric_and_end_at_the_last_step():
    assert checkpoint_steps(100, 5, first_step=4) == [4, 9, 20, 45, 100]
    assert checkpoint_steps(3, 6) == [1, 2, 3]
    with pytest.raises(UsageError):
        checkpoint_steps(10, 1)


def test_study_checkpoints_count_the_tokens_trained_on_up_to_their_step(
    train_data, demo_tokenizer, demo_base_dir, tmp_path
):
    """Each checkpoint's token count is the real (unpadded) tokens of the micro-batches of the steps before
    it, recomputed here from the batch order alone (the study learns it from the step callback)."""
    from kaggle_utils.core.config import FoldConfig, PipelineConfig, TrainConfig
    from kaggle_utils.data.folds import make_folds
    from kaggle_utils.studies.qid import run_qid_study
    from kaggle_utils.train.fold_data import split_fold, training_examples
    from kaggle_utils.train.steps import epoch_batches, epoch_examples

    frame = train_data.frame.head(60)
    folds = make_folds(frame, FoldConfig(n_folds=3, seed=0))
    cfg = PipelineConfig()
    cfg.model.base_model = str(demo_base_dir)
    cfg.model.gradient_checkpointing = False
    cfg.format.max_length = 128
    cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout = 4, 8, 0.0
    cfg.train = TrainConfig(
        learning_rate=1e-3,
        epochs=1,
        per_device_batch_size=4,
        grad_accum=2,
        max_steps=4,
        save_every_steps=1000,
        eval_rows_cap=0,
    )
    result = run_qid_study(
        cfg,
        frame,
        folds,
        demo_tokenizer,
        tmp_path,
        n_checkpoints=3,
        schemes=("int8",),
        n_bootstrap=4,
        progress=False,
    )

    train_part, _ = split_fold(frame, folds, 0)
    lengths = training_examples(train_part, demo_tokenizer, cfg).lengths
    chosen = epoch_examples(train_part.height, cfg.train, 0)
    batches = epoch_batches(lengths[chosen], cfg.train, 0)
    per_step = [
        sum(int(lengths[chosen][i]) for batch in batches[k : k + 2] for i in batch) for k in range(0, 8, 2)
    ]
    assert [c.step for c in result.checkpoints] == [1, 2, 4]
    assert [c.tokens for c in result.checkpoints] == [sum(per_step[:s]) for s in (1, 2, 4)]
    assert all(np.isfinite(c.log_loss_16bit) for c in result.checkpoints)
