"""Training losses: `loss_fn(logits, batch) -> scalar loss`, the one place a new training objective goes.

`train_fold(..., loss_fn=...)` calls it on the classifier's logits (batch, classes) and the collated batch:
``input_ids``, ``attention_mask``, ``labels`` (class indices, A/B-swapped on swapped copies) and one float
tensor (batch, classes) per `target_columns` entry (e.g. a teacher's probabilities, swapped as the label is).
Distillation from teacher soft targets is `soft_target_cross_entropy` with the teacher's probabilities in a
training-frame column named in `target_columns`; pseudo-labels are rows whose label or soft target came from a
model. The loss is computed under the accelerator's autocast, as the model's own loss was.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

LossFn = Callable[[torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]

SOFT_LABELS = "soft_labels"  # the batch field `soft_target_cross_entropy` reads by default


def cross_entropy_loss(logits: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean cross-entropy against the hard labels: the default, the same number as the HF classifier's own
    ``model(**batch).loss`` (tests/test_training.py checks equality)."""
    return F.cross_entropy(logits.view(-1, logits.shape[-1]), batch["labels"].view(-1))


def soft_target_cross_entropy(logits: torch.Tensor, batch: dict[str, torch.Tensor],
                              field: str = SOFT_LABELS) -> torch.Tensor:
    """Mean cross-entropy against target distributions in ``batch[field]`` (batch, classes), rows summing to 1.

    With a teacher's probabilities this is distillation (it differs from KL(teacher || student) by the
    teacher's entropy, a constant: the same gradients); with one-hot targets it equals `cross_entropy_loss`.
    """
    targets = batch[field].to(logits.device)
    if targets.shape != logits.shape:
        raise ValueError(f"batch[{field!r}] has shape {tuple(targets.shape)}, the logits {tuple(logits.shape)}")
    return -(targets * F.log_softmax(logits, dim=-1)).sum(dim=-1).mean()
