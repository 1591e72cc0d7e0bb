"""Distillation loss: reduces to cross-entropy in its special cases, temperature and mixing as stated."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from kaggle_utils.train.losses import (
    SOFT_LABELS,
    cross_entropy_loss,
    distillation_loss,
    loss_from_config,
    soft_target_cross_entropy,
    tempered_probs,
)


def _batch(n: int = 16, seed: int = 0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 3, generator=generator) * 2
    labels = torch.randint(0, 3, (n,), generator=generator)
    teacher = torch.softmax(torch.randn(n, 3, generator=generator), dim=-1)
    return logits, {"labels": labels, SOFT_LABELS: teacher}


def test_one_hot_teacher_at_weight_one_and_t_one_is_cross_entropy():
    logits, batch = _batch()
    batch[SOFT_LABELS] = F.one_hot(batch["labels"], 3).float()
    expected = cross_entropy_loss(logits, batch)
    torch.testing.assert_close(distillation_loss(logits, batch, weight=1.0, temperature=1.0), expected)
    torch.testing.assert_close(soft_target_cross_entropy(logits, batch), expected)


def test_weight_zero_ignores_the_teacher_and_is_cross_entropy():
    logits, batch = _batch()
    torch.testing.assert_close(
        distillation_loss(logits, batch, weight=0.0, temperature=3.0), cross_entropy_loss(logits, batch)
    )


@pytest.mark.parametrize("eps", [0.05, 0.1, 0.3])
def test_label_smoothing_matches_torch(eps):
    logits, batch = _batch()
    expected = torch.nn.CrossEntropyLoss(label_smoothing=eps)(logits, batch["labels"])
    torch.testing.assert_close(distillation_loss(logits, batch, weight=0.0, label_smoothing=eps), expected)
    loss_fn, fields = loss_from_config(0.5, 2.0, eps, soft_targets=False)
    assert fields == ()
    torch.testing.assert_close(loss_fn(logits, batch), expected)


def test_soft_term_is_t_squared_kl_at_temperature_and_mixes_linearly():
    logits, batch = _batch()
    t, alpha = 2.5, 0.3
    teacher = batch[SOFT_LABELS]
    teacher_t = teacher ** (1 / t) / (teacher ** (1 / t)).sum(-1, keepdim=True)
    student_t = torch.log_softmax(logits / t, dim=-1)
    kl = (teacher_t * (teacher_t.log() - student_t)).sum(-1).mean()
    expected = alpha * t * t * kl + (1 - alpha) * F.cross_entropy(logits, batch["labels"])
    torch.testing.assert_close(distillation_loss(logits, batch, weight=alpha, temperature=t), expected)
    # a teacher equal to the student at T is a zero soft term
    batch[SOFT_LABELS] = torch.softmax(logits, dim=-1)
    assert float(distillation_loss(logits, batch, weight=1.0, temperature=t)) == pytest.approx(0.0, abs=1e-6)


def test_tempered_probs_are_softmax_of_log_probs_over_t():
    probs = torch.tensor([[0.7, 0.2, 0.1], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(tempered_probs(probs, 2.0)[0], torch.softmax(probs[0].log() / 2.0, dim=-1))
    torch.testing.assert_close(tempered_probs(probs, 2.0)[1], probs[1])  # one-hot stays one-hot


def test_loss_from_config_picks_distillation_when_rows_carry_soft_targets():
    logits, batch = _batch()
    loss_fn, fields = loss_from_config(0.4, 1.5, 0.1, soft_targets=True)
    assert fields == (SOFT_LABELS,)
    torch.testing.assert_close(
        loss_fn(logits, batch),
        distillation_loss(logits, batch, weight=0.4, temperature=1.5, label_smoothing=0.1),
    )
    assert loss_from_config(0.5, 1.0, 0.0, soft_targets=False) == (cross_entropy_loss, ())


def test_bf16_logits_under_autocast_give_the_float32_loss():
    """On GPU the loss runs under autocast on 16-bit logits: the soft term is computed in float32."""
    logits, batch = _batch()
    expected = distillation_loss(logits, batch, weight=0.6, temperature=2.0, label_smoothing=0.1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = distillation_loss(logits.bfloat16(), batch, weight=0.6, temperature=2.0, label_smoothing=0.1)
    assert torch.isfinite(got) and float(got) == pytest.approx(float(expected), rel=2e-2)
