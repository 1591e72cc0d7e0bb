"""Training losses: `loss_fn(logits, batch) -> scalar loss`, the one place a new training objective goes.

`train_fold(..., loss_fn=...)` calls it on the classifier's logits (batch, classes) and the collated batch:
``input_ids``, ``attention_mask``, ``labels`` (class indices, A/B-swapped on swapped copies) and one float
tensor (batch, classes) per `target_columns` entry (e.g. a teacher's probabilities, swapped as the label is).
Distillation from teacher soft targets is `soft_target_cross_entropy` with the teacher's probabilities in a
training-frame column named in `target_columns`; pseudo-labels are rows whose label or soft target came from a
model. The loss is computed under the accelerator's autocast, as the model's own loss was.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from kaggle_utils.core.config import TrainConfig
from kaggle_utils.core.errors import UsageError

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

SOFT_LABELS = "soft_labels"  # the batch field `soft_target_cross_entropy` reads by default


def cross_entropy_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy against the hard labels: the default, the same number as the HF classifier's own
    ``model(**batch).loss`` (tests/train/test_loop.py checks equality)."""
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), batch["labels"].view(-1))


def soft_target_cross_entropy(
    logits: torch.Tensor, batch: dict[str, torch.Tensor], field: str = SOFT_LABELS
) -> torch.Tensor:
    """Mean cross-entropy against target distributions ``batch[field]`` (batch, classes), rows summing to 1.

    With a teacher's probabilities this is distillation (it differs from KL(teacher || student) by the
    teacher's entropy, a constant: the same gradients); with one-hot targets it equals `cross_entropy_loss`.
    """
    targets = batch[field].to(logits.device)
    if targets.shape != logits.shape:
        raise ValueError(
            f"batch[{field!r}] has shape {tuple(targets.shape)}, the logits {tuple(logits.shape)}"
        )
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()


def distillation_loss(
    logits: torch.Tensor,
    batch: dict[str, torch.Tensor],
    *,
    weight: float = 1.0,
    temperature: float = 1.0,
    label_smoothing: float = 0.0,
    field: str = SOFT_LABELS,
) -> torch.Tensor:
    """Hinton distillation mixed with hard-label cross-entropy:
    ``weight * T^2 * KL(teacher_T || softmax(logits / T)) + (1 - weight) * CE_eps(logits, labels)``.

    ``teacher_T`` is the teacher's probabilities sharpened or softened as its logits would be (p^(1/T),
    renormalised); T^2 keeps the soft term's gradient scale independent of T. With a one-hot teacher, weight 1
    and T 1 this is exactly `cross_entropy_loss`; weight 0 gives (label-smoothed) cross-entropy alone, the
    same number as torch's ``CrossEntropyLoss(label_smoothing=eps)``.
    """
    total = logits.new_zeros(())
    flat = logits.view(-1, logits.shape[-1])
    if weight < 1:
        hard = F.cross_entropy(flat, batch["labels"].view(-1), label_smoothing=label_smoothing)
        total = total + (1 - weight) * hard
    if weight > 0:
        targets = batch[field].to(device=logits.device, dtype=torch.float32)
        if targets.shape != flat.shape:
            raise ValueError(
                f"batch[{field!r}] has shape {tuple(targets.shape)}, the logits {tuple(flat.shape)}"
            )
        teacher = tempered_probs(targets, temperature)
        log_student = F.log_softmax(flat.float() / temperature, dim=-1)
        soft = F.kl_div(log_student, teacher, reduction="batchmean")  # xlogy: a teacher's zeros add nothing
        total = total + weight * temperature**2 * soft
    return total


def tempered_probs(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """p^(1/T) renormalised per row: softmax(log p / T), the teacher's distribution at temperature T."""
    if temperature == 1.0:
        return probs / probs.sum(dim=-1, keepdim=True)
    powered = probs.clamp_min(0) ** (1.0 / temperature)
    return powered / powered.sum(dim=-1, keepdim=True)


def loss_from_config(
    weight: float, temperature: float, label_smoothing: float, soft_targets: bool
) -> tuple[LossFn, tuple[str, ...]]:
    """The loss a TrainConfig asks for and the batch fields it needs: distillation when rows carry soft
    targets (a teacher, pseudo-labels), label-smoothed cross-entropy when only smoothing is set, else the
    default cross-entropy."""
    if soft_targets:

        def loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return distillation_loss(
                logits, batch, weight=weight, temperature=temperature, label_smoothing=label_smoothing
            )

        return loss, (SOFT_LABELS,)
    if label_smoothing > 0:

        def smoothed(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
            return F.cross_entropy(
                logits.view(-1, logits.shape[-1]), batch["labels"].view(-1), label_smoothing=label_smoothing
            )

        return smoothed, ()
    return cross_entropy_loss, ()


def select_loss(
    tc: TrainConfig, loss_fn: LossFn | None, target_columns: Sequence[str]
) -> tuple[LossFn, tuple[str, ...], dict]:
    """(loss, batch fields it needs, a record for the summary): the caller's `loss_fn` with `target_columns`,
    or the one the config asks for (`loss_from_config`). Both at once is refused: which would win?"""
    soft = tc.teacher_path is not None or tc.pseudo_path is not None
    if loss_fn is not None:
        if soft or tc.label_smoothing > 0:
            raise UsageError(
                "train_fold got a loss_fn and the config sets train.teacher_path / pseudo_path / "
                "label_smoothing; use one or the other"
            )
        return (
            loss_fn,
            tuple(target_columns),
            {
                "loss": getattr(loss_fn, "__name__", type(loss_fn).__name__),
                "target_columns": list(target_columns),
            },
        )
    fn, fields = loss_from_config(tc.distill_weight, tc.distill_temperature, tc.label_smoothing, soft)
    if soft:
        info = {
            "loss": "distillation",
            "distill_weight": tc.distill_weight,
            "distill_temperature": tc.distill_temperature,
            "label_smoothing": tc.label_smoothing,
        }
    else:
        info = {
            "loss": "label_smoothed_cross_entropy" if tc.label_smoothing > 0 else "cross_entropy",
            "label_smoothing": tc.label_smoothing,
        }
    return fn, (*target_columns, *(f for f in fields if f not in target_columns)), info
