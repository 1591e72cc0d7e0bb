"""One device's forward callable and the errors the scheduler tells apart, shared by the in-process
threads (`replicas`) and the worker processes (`workers`)."""

from __future__ import annotations

import contextlib
import traceback
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.classifier import forward_probs
from kaggle_utils.models.devices import check_dtype_range
from kaggle_utils.text.batching import PadCollator

ForwardFn = Callable[[list[list[int]]], np.ndarray]


class WorkerLost(RuntimeError):
    """A forward whose worker is gone for good (its process died): the batch is redone by another device and
    this one retired at once, instead of counting it as a failed batch whose rows fall back."""


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA raises torch.OutOfMemoryError; other backends (XLA, older torch) a RuntimeError saying so."""
    if isinstance(error, torch.OutOfMemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and (
        "out of memory" in text.lower() or "RESOURCE_EXHAUSTED" in text
    )


def make_forward(model: Any, pad_token_id: int, device: str) -> ForwardFn:
    """token lists -> probs on one device, through the shared collator and `classifier.forward_probs`."""
    collate = PadCollator(pad_token_id)
    # Each device's worker thread makes its GPU the current one (kernels that use the current device, e.g.
    # some bitsandbytes paths, would otherwise run against cuda:0).
    context = (
        (lambda: torch.cuda.device(device)) if str(device).startswith("cuda") else contextlib.nullcontext
    )

    def forward(seqs: list[list[int]]) -> np.ndarray:
        batch = collate([{"input_ids": seq} for seq in seqs])
        with context():
            batch = {key: value.to(device) for key, value in batch.items() if isinstance(value, torch.Tensor)}
            return forward_probs(model, batch)

    return forward


def preflight_dtype(model: Any, pad_token_id: int, device: str, seqs: list[list[int]], setting: str) -> dict:
    """`devices.check_dtype_range` on a few real rows, padded as `make_forward` pads them: a model that would
    overflow float16 is refused (DtypeRangeError naming `setting`) before any row is predicted."""
    batch = PadCollator(pad_token_id)([{"input_ids": seq} for seq in seqs])
    return check_dtype_range(
        model, batch["input_ids"].to(device), batch["attention_mask"].to(device), setting
    )


def tokenizer_pad_id(tokenizer: Any) -> int:
    """The tokenizer's pad token id; UsageError when it has none (rows could not be padded)."""
    pad = tokenizer.pad_token_id
    if pad is None:
        raise UsageError("the artifact's tokenizer has no pad token id")
    return int(pad)


def describe_error(error: BaseException) -> dict:
    """An error as report data: type, message and the end of its traceback (truncated)."""
    return {
        "type": type(error).__name__,
        "message": str(error)[:500],
        "traceback": "".join(traceback.format_exception(type(error), error, error.__traceback__)[-3:])[
            -1500:
        ],
    }
