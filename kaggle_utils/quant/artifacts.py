"""One inference-artifact layout for both orderings: `save_artifact` writes it, `load_artifact` reads it.

```
<artifact>/
  manifest.json  what it is and how it was made (quant/manifest.py); written last, so without it: incomplete
  model/         ft-then-quant: the merged model, quantized; quant-then-ft: the quantized base as trained on
  adapter/       quant-then-ft only: the unmerged peft adapter, incl. the fully trained `score` head
  merged/        optional (quant-then-ft): the adapter folded into the 4-bit weights
  tokenizer/     the tokenizer the model was trained with
```

The model's quantization backend (`quant/backends`) writes and reads `model/`; loading is offline, on CPU or
CUDA, and `load_artifact(..., dequantize=True)` gives plain 16-bit layers for runtimes without bitsandbytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import json
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kaggle_utils import __version__
from kaggle_utils.core.config import FormatConfig
from kaggle_utils.core.errors import ArtifactError
from kaggle_utils.models.devices import default_device, resolve_dtype
from kaggle_utils.models.real import check_tokenizer_model
from kaggle_utils.quant.backends import BACKEND_FIELD, LoadOptions, backend_for_manifest, backend_for_model
from kaggle_utils.quant.layout import (
    ADAPTER_DIR,
    LAYOUT_VERSION,
    MANIFEST_NAME,
    MERGED_DIR,
    MODEL_DIR,
    TOKENIZER_DIR,
)
from kaggle_utils.quant.manifest import file_table, json_ready, read_manifest, update_manifest
from kaggle_utils.text.template import TEMPLATE_VERSION
from kaggle_utils.text.tokenizer import load_tokenizer

__all__ = [  # the layout names are part of this module's API
    "ADAPTER_DIR",
    "LAYOUT_VERSION",
    "MANIFEST_NAME",
    "MERGED_DIR",
    "MODEL_DIR",
    "TOKENIZER_DIR",
    "LoadedArtifact",
    "save_artifact",
    "load_artifact",
    "attach_merged_copy",
    "artifact_size_bytes",
    "save_checkpoint",
    "remove_stale_staging",
]
# An abandoned staging folder (its saver died) is removed by the next save of the same artifact; one from the
# old naming (no pid in the name) only when older than this.
STALE_UNOWNED_STAGING_S = 24 * 3600.0
# transformers' and accelerate's loaders patch class attributes while they run (PreTrainedModel.tie_weights,
# nn.Module.register_parameter) and restore what they saw on entry: two loads at once (ensemble members side
# by side) can leave the patch in place for the rest of the process. Loads take turns.
_LOAD_LOCK = threading.Lock()
# Fields the caller must supply; the rest are derived from the model, tokenizer and format config.
CALLER_FIELDS: tuple[str, ...] = ("ordering", "variant", "base_model", "folds_file_hash", "cv_scores")


@dataclass
class LoadedArtifact:
    model: Any  # PreTrainedModel, or a PeftModel (quantized base + adapter)
    tokenizer: Any
    manifest: dict
    format_config: FormatConfig
    path: Path | None = None


def save_artifact(
    out_dir: str | Path,
    model: nn.Module,
    tokenizer,
    manifest_fields: dict,
    format_config: FormatConfig,
    merged_model: nn.Module | None = None,
) -> Path:
    """Write `model` (a plain/quantized classifier, or a peft model with an unmerged adapter) as an artifact.

    The directory is assembled beside `out_dir` and renamed into place, so an interrupted save never leaves a
    half-written artifact under the real name. An existing artifact at `out_dir` is replaced.
    """
    missing = [name for name in CALLER_FIELDS if name not in manifest_fields]
    if missing:
        raise ArtifactError(f"save_artifact: manifest_fields lacks {missing}")
    out_dir = Path(out_dir)
    with staged_folder(out_dir) as staging:
        has_adapter = hasattr(model, "peft_config")
        backend = backend_for_model(model)
        if not backend.save_model(model, staging / MODEL_DIR):  # GPTQ writes its compressed-tensors format
            save_checkpoint(model, staging / MODEL_DIR)
        if has_adapter:
            model.save_pretrained(str(staging / ADAPTER_DIR))
        if merged_model is not None:
            save_checkpoint(merged_model, staging / MERGED_DIR)
        tokenizer.save_pretrained(str(staging / TOKENIZER_DIR))
        inner = model.get_base_model() if has_adapter else model
        manifest = {
            "layout_version": LAYOUT_VERSION,
            BACKEND_FIELD: backend.name,
            **backend.manifest_fields(model),
            "dtype": _compute_dtype_name(model),
            "max_length": format_config.max_length,
            "template_version": TEMPLATE_VERSION,
            "format_config": json_ready(dataclasses.asdict(format_config)),
            "package_version": __version__,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "num_labels": int(inner.config.num_labels),
            "pad_token_id": int(inner.config.pad_token_id),
            "attn_implementation": inner.config._attn_implementation,
            "has_adapter": has_adapter,
            "has_merged": merged_model is not None,
            **json_ready(manifest_fields),
        }
        manifest["files"] = file_table(staging)
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2), encoding="utf-8")
    return out_dir


@contextlib.contextmanager
def staged_folder(out_dir: str | Path) -> Iterator[Path]:
    """Build a folder beside `out_dir` and rename it into place when the block ends without error, replacing
    what was there; on any error the staging folder is removed and `out_dir` is left as it was.

        with staged_folder(out) as staging:
            (staging / "manifest.json").write_text(...)
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_staging(out_dir)
    # The saver's pid is in the name, so a later save can tell an abandoned staging folder from a live one.
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.{os.getpid()}.", dir=out_dir.parent))
    try:
        yield staging
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def remove_stale_staging(out_dir: str | Path) -> list[Path]:
    """Remove staging folders `.<name>.<pid>.<random>` beside `out_dir` whose saving process is gone (on this
    machine), and `.<name>.<random>` ones of the old naming older than a day; returns what was removed.

    A folder whose pid is alive is left alone (it may be a concurrent save); symlinks are never followed."""
    out_dir = Path(out_dir)
    with_pid = re.compile(rf"^\.{re.escape(out_dir.name)}\.(\d+)\.[a-z0-9_]{{8}}$")
    without_pid = re.compile(rf"^\.{re.escape(out_dir.name)}\.[a-z0-9_]{{8}}$")
    removed = []
    try:
        siblings = list(out_dir.parent.iterdir())
    except OSError:
        return removed
    for path in siblings:
        if path.is_symlink() or not path.is_dir():
            continue
        match = with_pid.match(path.name)
        if match:
            stale = not _pid_alive(int(match.group(1)))
        elif without_pid.match(path.name):
            stale = time.time() - path.stat().st_mtime > STALE_UNOWNED_STAGING_S
        else:
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def save_checkpoint(model: nn.Module, out_dir: str | Path) -> Path:
    """Save a classifier as a plain transformers checkpoint (config.json + model.safetensors), quantized
    layers included; for a peft model, only the frozen base (the adapter is saved by peft, unmerged).
    Written by hand, not with `save_pretrained` (why: docs/DESIGN_NOTES.md, quant/artifacts.py).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    inner = model.get_base_model() if hasattr(model, "peft_config") else model
    state = {}
    for key, value in inner.state_dict().items():
        if ".lora_" in key or ".modules_to_save." in key or "lora_magnitude_vector" in key:
            continue
        state[key.replace(".base_layer.", ".").replace(".original_module.", ".")] = (
            value.detach().contiguous()
        )
    inner.config.save_pretrained(str(out_dir))
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


def load_artifact(
    path: str | Path,
    device: str | torch.device | None = None,
    compute_dtype: torch.dtype | None = None,
    dequantize: bool = False,
    use_merged: bool = False,
    verify_hashes: bool = True,
) -> LoadedArtifact:
    """Load an artifact for prediction (eval mode) on `device` (default: CUDA if present, else CPU).

    `compute_dtype` (default: the hardware's, see `devices.resolve_dtype`) applies to the unquantized tensors
    and the 4-bit layers' compute. `dequantize=True` returns plain `nn.Linear` layers (adapter merged) in
    `compute_dtype or bfloat16` on CPU, for runtimes without bitsandbytes. `use_merged` loads `merged/`.
    `verify_hashes` (default) checks every listed file's sha256 first; False only checks sizes.
    """
    root = Path(path)
    manifest = read_manifest(root, verify_hashes=verify_hashes)
    backend = backend_for_manifest(manifest, root / MANIFEST_NAME)
    if dequantize:
        device = torch.device("cpu")
        dtype = compute_dtype or torch.bfloat16
    else:
        device = torch.device(device) if device is not None else default_device()
        dtype = compute_dtype or resolve_dtype("auto", device)
    if use_merged and not manifest.get("has_merged"):
        raise ArtifactError(f"{root}: use_merged=True but the artifact has no {MERGED_DIR}/ copy")
    model_dir = root / (MERGED_DIR if use_merged else MODEL_DIR)
    with _LOAD_LOCK:
        model = backend.load_artifact(
            root,
            manifest,
            LoadOptions(device=device, dtype=dtype, dequantize=dequantize, use_merged=use_merged),
        )
    model.eval()
    tokenizer = load_tokenizer(root / TOKENIZER_DIR)
    format_config = FormatConfig(**_restore_tuples(FormatConfig, manifest["format_config"]))
    if backend.checks_tokenizer:  # ids must index this model's own embeddings
        check_tokenizer_model(
            tokenizer,
            model.config,
            root / TOKENIZER_DIR,
            model_dir,
            template=format_config.template,
            embedding_rows=model.get_input_embeddings().weight.shape[0],
            error=ArtifactError,
            real_weights=not getattr(model.config, "kaggle_utils_random_weights", False),
        )
    return LoadedArtifact(
        model=model, tokenizer=tokenizer, manifest=manifest, format_config=format_config, path=root
    )


def artifact_size_bytes(path: str | Path, include_merged: bool = False) -> int:
    """Bytes on disk of what ships (everything but the optional merged copy unless asked)."""
    root = Path(path)
    total = 0
    for file in root.rglob("*"):
        if file.is_file() and (include_merged or MERGED_DIR not in file.relative_to(root).parts[:1]):
            total += file.stat().st_size
    return total


def attach_merged_copy(path: str | Path, merged_model: nn.Module) -> Path:
    """Add `merged/` (the adapter folded into the quantized weights) to an existing adapter artifact."""
    root = Path(path)
    manifest = read_manifest(root)
    if not manifest.get("has_adapter"):
        raise ArtifactError(f"{root}: has no adapter, so there is nothing to merge")
    target = root / MERGED_DIR
    staging = root / f".{MERGED_DIR}.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_checkpoint(merged_model, staging)
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)
    files = {k: v for k, v in manifest["files"].items() if not k.startswith(f"{MERGED_DIR}/")}
    files.update({f"{MERGED_DIR}/{name}": info for name, info in file_table(target).items()})
    update_manifest(root, has_merged=True, files=files)
    return target


def _compute_dtype_name(model: nn.Module) -> str:
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "unknown"


def _restore_tuples(section_cls: type, values: dict) -> dict:
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - known
    if unknown:
        raise ArtifactError(f"manifest format_config has fields this code does not know: {sorted(unknown)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
