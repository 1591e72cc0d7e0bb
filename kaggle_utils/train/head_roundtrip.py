"""Check that a saved classifier reloads as trained: unsloth's merged 16-bit save can drop the `score` head
or `num_labels`. `check_unsloth_head_roundtrip` saves, reloads with transformers and compares."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.classifier import predict_probs
from kaggle_utils.train.model_setup import HEAD_MARKER

# A reload that kept the trained head changes it by bf16 rounding only (~1e-3 relative); a dropped or
# re-initialised head differs by the size of the weights themselves, and its probabilities by tenths.
HEAD_ROUNDTRIP_HEAD_ATOL = 1e-2
HEAD_ROUNDTRIP_PROBS_ATOL = 2e-2


def check_unsloth_head_roundtrip(
    model: nn.Module, tokenizer, out_dir: str | Path, probe: list[list[int]]
) -> dict:
    """Save an unsloth-trained classifier merged to 16-bit, reload it with plain transformers and check what
    unsloth is known to lose: the trained `score` head and `num_labels` (GPU only; the GPU benchmark
    calls it).

    Raises UsageError naming what was lost (`verify_reloaded_classifier`); returns the measured differences.
    """
    from transformers import AutoModelForSequenceClassification

    out_dir = Path(out_dir)
    # What the trained model gives, taken before the save (which may merge the adapter in place).
    trained_head = _head_weight(model).detach().float().cpu().clone()
    expected = predict_probs(model, probe, tokenizer.pad_token_id)
    num_labels = model.config.num_labels
    model.save_pretrained_merged(str(out_dir), tokenizer, save_method="merged_16bit")
    reloaded = AutoModelForSequenceClassification.from_pretrained(
        str(out_dir), local_files_only=True, device_map={"": str(_device_of(model))}
    )
    return verify_reloaded_classifier(
        reloaded, trained_head, expected, num_labels, probe, tokenizer.pad_token_id, source=str(out_dir)
    )


def verify_reloaded_classifier(
    reloaded: nn.Module,
    trained_head: torch.Tensor,
    expected_probs: np.ndarray,
    num_labels: int,
    probe: list[list[int]],
    pad_token_id: int,
    source: str = "reloaded model",
    head_atol: float = HEAD_ROUNDTRIP_HEAD_ATOL,
    probs_atol: float = HEAD_ROUNDTRIP_PROBS_ATOL,
) -> dict:
    """Compare a saved-and-reloaded classifier with what the trained model gave: the same `num_labels`, the
    same head (max |diff| <= head_atol) and the same probabilities on `probe` (max |diff| <= probs_atol).

    Raises UsageError listing every difference beyond tolerance (a save that silently dropped the head would
    otherwise ship a random classifier); returns the measured differences.
    """
    problems = []
    if reloaded.config.num_labels != num_labels:
        problems.append(f"num_labels {reloaded.config.num_labels} != {num_labels}")
    trained_head = trained_head.detach().float().cpu()
    reloaded_head = _head_weight(reloaded).detach().float().cpu()
    if reloaded_head.shape != trained_head.shape:
        problems.append(f"score head shape {tuple(reloaded_head.shape)} != {tuple(trained_head.shape)}")
        head_difference = math.inf
    else:
        head_difference = float((reloaded_head - trained_head).abs().max())
    if not head_difference <= head_atol:
        problems.append(
            f"score head differs from the trained one by {head_difference:.3g} > {head_atol:g} "
            "(dropped on save?)"
        )
    got = predict_probs(reloaded, probe, pad_token_id)
    probs_difference = (
        float(np.abs(got - expected_probs).max()) if got.shape == expected_probs.shape else math.inf
    )
    if not probs_difference <= probs_atol:
        problems.append(f"probabilities on the probe rows differ by {probs_difference:.3g} > {probs_atol:g}")
    if problems:
        raise UsageError(
            f"{source}: the saved classifier does not reproduce the trained one: " + "; ".join(problems)
        )
    return {
        "num_labels": reloaded.config.num_labels,
        "head_max_abs_diff": head_difference,
        "probs_max_abs_diff": probs_difference,
    }


def _head_weight(model: nn.Module) -> torch.Tensor:
    for name, param in model.named_parameters():
        if name.endswith(f"score.{HEAD_MARKER}.default.weight"):
            return param
    for name, param in model.named_parameters():
        if name.endswith("score.weight"):
            return param
    raise UsageError("model has no score head")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
