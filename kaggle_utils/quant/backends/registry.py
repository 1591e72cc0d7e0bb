"""Quantization backends by name: each quantizes a model, loads a quantized base and reads its artifacts.

`backend_for_model` finds the backend that made a model (`save_artifact` records it as `quant_backend`),
`backend_for_manifest` the one that reads an artifact. A new backend: one module subclassing `QuantBackend`
and ending in `register_backend(...)`, plus its name in the import line of `quant/backends/__init__.py`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import ArtifactError, UsageError
from kaggle_utils.core.registry import Registry
from kaggle_utils.quant.layout import BACKEND_FIELD

# Manifest field naming the backend that wrote the artifact (artifacts written before it existed lack it:
# `backend_name_for_manifest` tells their backend from `quant_scheme` / `int4_format`, which they do have).
# What a manifest without `quant_backend` was written by: group-wise INT4 always set `int4_format`; every
# other artifact of layout 1 was loaded through transformers with one of these schemes.
LEGACY_BACKENDS: dict[str, str] = {"none": "none", "int8": "bitsandbytes", "nf4": "bitsandbytes"}


@dataclass(frozen=True)
class LoadOptions:
    """How `artifacts.load_artifact` wants the model: where, which dtype, dequantized or not, which copy."""

    device: torch.device
    dtype: torch.dtype
    dequantize: bool = False  # plain nn.Linear layers (adapter merged), for runtimes without its kernels
    use_merged: bool = False  # load merged/ (the adapter folded into the quantized weights)


class QuantBackend(ABC):
    """One quantization library or format. Subclasses set `name` and implement the five methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    # The backend that owns any model no other backend claims (plain 16-bit weights); at most one.
    fallback: ClassVar[bool] = False
    # `artifacts.load_artifact` checks the tokenizer against the model's embeddings (real_models) when True.
    checks_tokenizer: ClassVar[bool] = True

    @abstractmethod
    def accepts_scheme(self, scheme: str) -> bool:
        """True when a manifest's `quant_scheme` is one this backend writes."""

    @abstractmethod
    def owns_model(self, model: nn.Module) -> bool:
        """True when `model` (peft-wrapped or not) is quantized by this backend."""

    @abstractmethod
    def manifest_fields(self, model: nn.Module) -> dict:
        """Manifest fields describing `model`'s quantization (at least `quant_scheme`); refuses a model this
        backend cannot ship."""

    @abstractmethod
    def quantize(
        self,
        merged_model: nn.Module,
        cfg: PipelineConfig,
        device: str | torch.device | None = None,
        work_dir: str | Path | None = None,
    ) -> nn.Module:
        """The quantized model made from a merged (no adapter) 16-bit classifier (fine-tune -> quantize)."""

    @abstractmethod
    def load_base(
        self,
        path: str | Path,
        cfg: PipelineConfig,
        pad_token_id: int | None = None,
        device: str | torch.device | None = None,
    ) -> nn.Module:
        """A 16-bit checkpoint directory loaded quantized: the base an adapter trains on (quant-then-ft)."""

    def save_model(self, model: nn.Module, out_dir: Path) -> bool:
        """Write `model/` in this backend's own format and return True; False (the default) lets
        `artifacts.save_checkpoint` write the plain transformers checkpoint."""
        return False

    @abstractmethod
    def load_artifact(self, root: Path, manifest: dict, options: LoadOptions) -> nn.Module:
        """The artifact's model (with its adapter when it has one), from a manifest `manifest.read_manifest`
        already checked; `artifacts.load_artifact` adds the tokenizer and the checks every backend shares."""


BACKENDS: Registry[QuantBackend] = Registry("quantization backend")


def register_backend(backend: QuantBackend, replace: bool = False) -> QuantBackend:
    """Add `backend` under its name (a second of the same name needs `replace=True`); at most one fallback."""
    if backend.fallback and any(b.fallback and b.name != backend.name for b in BACKENDS.values()):
        raise UsageError(f"quantization backend {backend.name!r}: only one backend may be the fallback")
    return BACKENDS.register(backend, replace=replace)


def get_backend(name: str) -> QuantBackend:
    """The registered backend called `name`; UsageError listing the known ones otherwise."""
    return BACKENDS.get(name)


def backend_for_model(model: nn.Module) -> QuantBackend:
    """The backend whose layers `model` holds; the fallback (plain weights) when none claims it."""
    for backend in BACKENDS.values():
        if not backend.fallback and backend.owns_model(model):
            return backend
    for backend in BACKENDS.values():
        if backend.fallback:
            return backend
    raise UsageError(
        f"no quantization backend handles {type(model).__name__} (registered: {sorted(BACKENDS)})"
    )


def backend_name_for_manifest(manifest: dict) -> str:
    """`quant_backend` when the manifest names it; for a manifest written before the field existed, the
    backend its fields imply (`int4_format` -> int4, else the bitsandbytes schemes or none)."""
    if BACKEND_FIELD in manifest:
        return str(manifest[BACKEND_FIELD])
    if manifest.get("int4_format"):
        return "int4"
    return LEGACY_BACKENDS.get(str(manifest.get("quant_scheme")), "")


def backend_for_manifest(manifest: dict, where: str | Path) -> QuantBackend:
    """The registered backend that reads this manifest's artifact; ArtifactError naming the manifest when the
    backend is unknown here or does not write the manifest's `quant_scheme`."""
    name = backend_name_for_manifest(manifest)
    scheme = str(manifest.get("quant_scheme"))
    if name not in BACKENDS:
        what = f"{BACKEND_FIELD} {name!r}" if name else f"quant_scheme {scheme!r}"
        raise ArtifactError(f"{where}: unknown {what} in the manifest (backends here: {sorted(BACKENDS)})")
    backend = BACKENDS[name]
    if not backend.accepts_scheme(scheme):
        raise ArtifactError(
            f"{where}: unknown quant_scheme {scheme!r} for the {name!r} quantization backend "
            f"({backend.description})"
        )
    return backend
