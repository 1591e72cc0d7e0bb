"""GPTQ backend: fine-tune -> merge -> GPTQ (8- or 4-bit weights) through llmcompressor, saved as
compressed-tensors. Optional extra (`requirements-gptq.txt`): quantizing needs llmcompressor, loading only
compressed-tensors; `gptq_unavailable()` says why it cannot run here.
"""

from __future__ import annotations

import importlib.metadata
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from kaggle_utils.core.config import PipelineConfig
from kaggle_utils.core.errors import ArtifactError, UsageError
from kaggle_utils.quant.backends.bnb import TransformersCheckpoint
from kaggle_utils.quant.backends.registry import LoadOptions, register_backend

GPTQ_SCHEME_PREFIX = "gptq-"
HEAD_MODULES: tuple[str, ...] = ("score",)  # the classifier head stays 16-bit, as under bitsandbytes
EXTRA_HINT = "pip install --no-deps -r requirements-gptq.txt"


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def gptq_unavailable() -> str | None:
    """Why GPTQ quantizing cannot run here (the optional llmcompressor extra missing or broken), or None."""
    try:
        import datasets  # noqa: F401
        import llmcompressor  # noqa: F401
        from llmcompressor.modifiers.quantization import GPTQModifier  # noqa: F401
    except Exception as error:  # an ImportError, or a version clash raised while importing
        return f"GPTQ needs the optional llmcompressor extra ({EXTRA_HINT}): {type(error).__name__}: {error}"
    return None


def gptq_load_unavailable() -> str | None:
    """Why a GPTQ artifact cannot be loaded here (compressed-tensors is missing), or None."""
    try:
        import compressed_tensors  # noqa: F401
    except Exception as error:
        return (
            f"loading a GPTQ artifact needs compressed-tensors ({EXTRA_HINT}): "
            f"{type(error).__name__}: {error}"
        )
    return None


def _weight_args(model: nn.Module) -> set[tuple[int, int | None]]:
    """(num_bits, group_size) of every layer compressed-tensors quantized in `model`."""
    found = set()
    for module in model.modules():
        scheme = getattr(module, "quantization_scheme", None)
        weights = getattr(scheme, "weights", None)
        if weights is not None:
            found.add((int(weights.num_bits), weights.group_size))
    return found


def _check_group_size(model: nn.Module, group_size: int) -> None:
    """UsageError unless `group_size` divides the in_features of every linear layer GPTQ quantizes."""
    in_features = {
        m.in_features
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.split(".")[0] not in HEAD_MODULES
    }
    bad = sorted(f for f in in_features if f % group_size)
    if bad:
        raise UsageError(
            f"qaware.gptq_group_size {group_size} must divide every layer's in_features (not {bad})"
        )


class GptqBackend(TransformersCheckpoint):
    name = "gptq"
    description = "GPTQ (llmcompressor), symmetric int8 / int4 weights, group-wise, compressed-tensors format"

    def accepts_scheme(self, scheme: str) -> bool:
        return scheme.startswith(GPTQ_SCHEME_PREFIX)

    def owns_model(self, model: nn.Module) -> bool:
        return bool(_weight_args(model))

    def manifest_fields(self, model: nn.Module) -> dict:
        """Refuses a peft model (GPTQ quantizes the merged model) or mixed bit widths / group sizes."""
        if hasattr(model, "peft_config"):
            raise UsageError("GPTQ artifact: the model still has a peft adapter; GPTQ ships the merged model")
        args = _weight_args(model)
        if len(args) != 1:
            raise UsageError(f"GPTQ artifact: expected one (bits, group size), found {sorted(args)}")
        bits, group = args.pop()
        return {
            "quant_scheme": f"{GPTQ_SCHEME_PREFIX}w{bits}-g{group}",
            "gptq_bits": bits,
            "gptq_group_size": group,
            "gptq_library": "llmcompressor",
            "gptq_library_version": _version("llmcompressor"),
            "compressed_tensors_version": _version("compressed-tensors"),
        }

    def save_model(self, model: nn.Module, out_dir: Path) -> bool:
        """The compressed-tensors checkpoint (packed int weights + scales), written by llmcompressor's
        `save_pretrained(save_compressed=True)`; the generic writer would store dense fake-quantized weights.

        llmcompressor rewrites config.json from the config file at `config._name_or_path` (for vLLM): for a
        classifier built on a pretrained causal-LM checkpoint that is the base's config, without the 3 labels,
        and the artifact would not reload. So during the save that path is a folder holding this model's own
        config; the written label count is checked."""
        original_name = model.config._name_or_path
        with tempfile.TemporaryDirectory(prefix="gptq-config-") as own_config:
            model.config.save_pretrained(own_config)
            model.config._name_or_path = own_config
            try:
                model.save_pretrained(str(out_dir), save_compressed=True)
            finally:
                model.config._name_or_path = original_name
        written = json.loads((Path(out_dir) / "config.json").read_text())
        labels = len(written.get("id2label") or {}) or written.get("num_labels")
        if labels != model.config.num_labels:
            raise ArtifactError(
                f"{out_dir}/config.json: written with {labels} labels, the model has "
                f"{model.config.num_labels}; the artifact would not reload"
            )
        return True

    def quantize(
        self,
        merged_model: nn.Module,
        cfg: PipelineConfig,
        device: str | torch.device | None = None,
        work_dir: str | Path | None = None,
        *,
        calibration_ids: Sequence[Sequence[int]] | None = None,
        tokenizer=None,
    ) -> nn.Module:
        """In place: GPTQ (`cfg.qaware.gptq_bits`, `.gptq_group_size`) of every linear layer but the head,
        calibrated on `calibration_ids` (the fold's training rows); the caller keeps a copy as reference."""
        reason = gptq_unavailable()
        if reason:
            raise UsageError(reason)
        if hasattr(merged_model, "peft_config"):
            raise UsageError("GPTQ needs the merged model: call merge_and_unload() on the peft model first")
        if not calibration_ids:
            raise UsageError("GPTQ needs calibration rows (encoded rows of the fold's training part)")
        if tokenizer is None:
            raise UsageError("GPTQ needs the tokenizer (llmcompressor's oneshot requires a processor)")
        from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
        from datasets import Dataset
        from llmcompressor import oneshot
        from llmcompressor.modifiers.quantization import GPTQModifier

        q = cfg.qaware
        _check_group_size(merged_model, q.gptq_group_size)
        if device is not None:
            merged_model.to(device)
        rows = [list(map(int, row)) for row in calibration_ids]
        dataset = Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * len(row) for row in rows]})
        scheme = QuantizationScheme(
            targets=["Linear"],
            weights=QuantizationArgs(
                num_bits=q.gptq_bits,
                type="int",
                symmetric=True,
                strategy="group",
                group_size=q.gptq_group_size,
            ),
        )
        recipe = GPTQModifier(config_groups={"group_0": scheme}, ignore=list(HEAD_MODULES))
        original_name = merged_model.config._name_or_path
        with tempfile.TemporaryDirectory(prefix="gptq-config-", dir=work_dir) as tmp:
            # oneshot re-reads the model's config from `_name_or_path`; an in-memory model has none.
            merged_model.config.save_pretrained(tmp)
            merged_model.config._name_or_path = tmp
            try:
                oneshot(
                    model=merged_model,
                    dataset=dataset,
                    recipe=recipe,
                    processor=tokenizer,
                    max_seq_length=max(len(row) for row in rows),
                    num_calibration_samples=len(rows),
                )
            finally:
                merged_model.config._name_or_path = original_name
        return merged_model.eval()

    def load_base(
        self,
        path: str | Path,
        cfg: PipelineConfig,
        pad_token_id: int | None = None,
        device: str | torch.device | None = None,
    ) -> nn.Module:
        raise UsageError(
            "the GPTQ backend quantizes a trained model (fine-tune -> quantize); it gives no base "
            "to train on (quant-then-ft uses bitsandbytes or int4)"
        )

    def load_artifact(self, root: Path, manifest: dict, options: LoadOptions) -> nn.Module:
        reason = gptq_load_unavailable()
        if reason:
            raise ArtifactError(f"{root}: {reason}")
        if manifest.get("has_adapter"):
            raise ArtifactError(
                f"{root}: a GPTQ artifact holds the merged model; the manifest says has_adapter"
            )
        return super().load_artifact(root, manifest, options)


GPTQ = register_backend(GptqBackend())
