"""Adapters whose update is constant within each quantization group, so they fold into INT4 zero points.

QA-LoRA (D = scaling * B @ A) and QA-HiRA (D = scaling * M, rows repeated); `merge_group_adapters` folds D
into the zero points (z' = z - d / s), leaving plain INT4. The derivation: docs/DESIGN_NOTES.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from kaggle_utils.core.errors import UsageError
from kaggle_utils.quant.int4 import Int4Linear, Int4Weight, replace_module

AdapterKind = Literal["qa-lora", "qa-hira"]


@dataclass
class GroupAdapterSettings:
    """Shape of the adapter; `rank`/`alpha` for QA-LoRA, `output_repeat` for QA-HiRA (None: same params)."""

    kind: AdapterKind = "qa-lora"
    rank: int = 4
    alpha: float = 8.0
    output_repeat: int | None = None
    dropout: float = 0.0


class GroupPooledAdapterLinear(nn.Module):
    """Frozen Int4Linear + trainable group-pooled adapter; `merged()` returns a plain Int4Linear."""

    def __init__(self, base: Int4Linear, settings: GroupAdapterSettings) -> None:
        super().__init__()
        self.base = base
        for parameter in base.parameters():
            parameter.requires_grad_(False)
        self.kind = settings.kind
        self.groups = base.in_features // base.group_size
        self.dropout = nn.Dropout(settings.dropout) if settings.dropout > 0 else nn.Identity()
        if settings.kind == "qa-lora":
            rank = min(settings.rank, self.groups, base.out_features)  # higher rank cannot be reached
            self.rank = rank
            self.scaling = settings.alpha / rank
            self.lora_A = nn.Parameter(torch.empty(rank, self.groups, device=base.qweight.device))
            self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=base.qweight.device))
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        elif settings.kind == "qa-hira":
            repeat = settings.output_repeat or hira_output_repeat(
                base.out_features, self.groups, settings.rank
            )
            if base.out_features % repeat:
                raise UsageError(
                    f"qa-hira output_repeat={repeat} must divide out_features={base.out_features}"
                )
            self.output_repeat = repeat
            self.rank = min(base.out_features // repeat, self.groups)
            self.scaling = settings.alpha / self.rank  # as LoRA's alpha / r, with the rank M can reach
            self.hira_M = nn.Parameter(
                torch.zeros(base.out_features // repeat, self.groups, device=base.qweight.device)
            )
        else:
            raise UsageError(f"unknown group adapter kind {settings.kind!r}; expected 'qa-lora' or 'qa-hira'")

    def group_update(self) -> Tensor:
        """d (out, groups): the weight update of every input in group g of row o (float32)."""
        if self.kind == "qa-lora":
            pooled_matrix = self.scaling * (self.lora_B.float() @ self.lora_A.float())
        else:
            pooled_matrix = self.scaling * self.hira_M.float().repeat_interleave(self.output_repeat, dim=0)
        return pooled_matrix / self.base.group_size

    def adapter_output(self, x: Tensor) -> Tensor:
        pooled = self.dropout(x).unflatten(-1, (self.groups, self.base.group_size)).mean(-1)
        if self.kind == "qa-lora":
            return (pooled @ self.lora_A.to(x.dtype).t() @ self.lora_B.to(x.dtype).t()) * self.scaling
        return (pooled @ self.hira_M.to(x.dtype).t()).repeat_interleave(
            self.output_repeat, dim=-1
        ) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + self.adapter_output(x)

    @torch.no_grad()
    def merged(self) -> Int4Linear:
        """Fold the update into the zero points: z' = z - d / s. Codes and scales are unchanged."""
        base = self.base
        scale = base.scale.to(torch.float32)
        zero = base.zero.to(torch.float32) - self.group_update() / scale
        folded = Int4Weight(
            codes=base.int4_weight().codes, scale=base.scale, zero=zero, group_size=base.group_size
        )
        return Int4Linear.from_weight(folded, base.bias)

    def extra_repr(self) -> str:
        return f"kind={self.kind}, groups={self.groups}, rank<={self.rank}"


def hira_output_repeat(out_features: int, groups: int, lora_rank: int) -> int:
    """Smallest output repeat dividing out_features whose M has at most QA-LoRA rank `lora_rank`'s params."""
    budget = lora_rank * (out_features + groups)
    for repeat in range(1, out_features + 1):
        if out_features % repeat == 0 and (out_features // repeat) * groups <= budget:
            return repeat
    return out_features


def add_group_adapters(model: nn.Module, settings: GroupAdapterSettings) -> list[str]:
    """Wrap every Int4Linear of `model` in a GroupPooledAdapterLinear (in place); returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, Int4Linear)]
    if not names:
        raise UsageError("the model has no Int4Linear layers: quantize it with int4.quantize_linears first")
    for name in names:
        replace_module(model, name, GroupPooledAdapterLinear(model.get_submodule(name), settings))
    return names


def merge_group_adapters(model: nn.Module) -> list[str]:
    """Replace every GroupPooledAdapterLinear by its merged Int4Linear (in place); returns their names."""
    names = [name for name, module in model.named_modules() if isinstance(module, GroupPooledAdapterLinear)]
    for name in names:
        replace_module(model, name, model.get_submodule(name).merged())
    return names


def adapter_parameters(model: nn.Module) -> Iterable[nn.Parameter]:
    """The adapters' own parameters (A, B or M), not the frozen INT4 base's."""
    for module in model.modules():
        if isinstance(module, GroupPooledAdapterLinear):
            yield from module.parameters(recurse=False)


def count_adapter_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in adapter_parameters(model))
