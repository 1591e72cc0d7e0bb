"""One inference-artifact layout for both orderings, described by `manifest.json`.

```
<artifact>/
  manifest.json      what it is and how it was made (below); written last, so a directory without it is incomplete
  model/             transformers checkpoint: ft-then-quant -> the merged model, quantized (bnb nf4 / int8);
                     quant-then-ft -> the quantized base exactly as trained on (no LoRA layers)
  adapter/           quant-then-ft only: the unmerged peft adapter, incl. the fully trained `score` head
  merged/            optional (quant-then-ft): the adapter folded into the 4-bit weights (one more rounding)
  tokenizer/         the tokenizer the model was trained with
```

Manifest fields: ordering, variant, base_model, quant_scheme, dtype, max_length, template_version,
format_config, folds_file_hash, cv_scores, class_prior, package_version, created_at, files (relative path ->
bytes, sha256), plus layout_version, quant_backend, num_labels, pad_token_id, has_adapter, has_merged and any
extra fields the caller passes. `quant_backend` names the backend of `kaggle_utils.quant.backends` that wrote
the model (``bitsandbytes``, ``int4``, ``gptq``, ``none``): `save_artifact` asks the registry which backend owns the model
and records its fields (`quant_scheme`, INT4's `int4_format`), and `load_artifact` hands `model/` to that
backend. A layout-1 manifest written before the field existed is read as before: `int4_format` means ``int4``,
quant_scheme int8/nf4 ``bitsandbytes``, none ``none``; an unknown backend or a scheme the backend does not
write is an ArtifactError naming the manifest. `load_artifact` refuses an artifact whose template version differs from the code's (the model
would see differently formatted text), one whose manifest does not fit its ordering (a quant-then-ft artifact
without its adapter would predict with the untrained base and a random score head), one whose files are
missing, unlisted or truncated, and, by default, one whose files do not match their sha256 (hashing runs at
0.65-0.97 GB/s measured with SHA-NI: ~10-15 s for an 8-bit 9B artifact of ~9.5 GB; `verify_hashes=False` skips it).

Loading is offline and works on CPU and CUDA (bitsandbytes 4-bit / 8-bit on both). Runtimes without
bitsandbytes (TPU) use ``load_artifact(..., dequantize=True)``: plain 16-bit layers holding exactly the
quantized values, with the adapter merged in (INT4's layers are plain PyTorch already and stay as they are).

An ensemble folder (`kind: ensemble`, written by `ship.write_shipped`) is an artifact too: its members copied
inside it (`members/<name>/`, the fallback baseline as `baseline.json`), named by paths relative to the folder,
and every file it holds listed in `files` with bytes and sha256; `check_ensemble_manifest` checks that it is
self-contained and intact (the upload and `inference.ensemble_members` call it).
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
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from kaggle_utils import __version__
from kaggle_utils.core.config import FormatConfig
from kaggle_utils.core.errors import ArtifactError
from kaggle_utils.core.fileio import atomic_write_bytes, file_sha256
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
from kaggle_utils.text.formatting import TEMPLATE_VERSION
from kaggle_utils.text.tokenizer import load_tokenizer
from kaggle_utils.train.baseline import MANIFEST_SUFFIX as BASELINE_MANIFEST_SUFFIX

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
    "read_manifest",
    "check_manifest_schema",
    "update_manifest",
    "attach_merged_copy",
    "artifact_size_bytes",
    "save_checkpoint",
    "remove_stale_staging",
    "ENSEMBLE_KIND",
    "read_ensemble_manifest",
    "check_ensemble_manifest",
    "read_manifest_json",
]
REQUIRED_FIELDS: tuple[str, ...] = (
    "ordering",
    "variant",
    "base_model",
    "quant_scheme",
    "dtype",
    "max_length",
    "template_version",
    "format_config",
    "folds_file_hash",
    "cv_scores",
    "package_version",
    "created_at",
    "files",
)
ORDERINGS: tuple[str, ...] = ("ft-then-quant", "quant-then-ft")
# Field -> accepted JSON types, checked on load (a wrong type is as unusable as a missing field).
FIELD_TYPES: dict[str, tuple[type, ...]] = {
    "ordering": (str,), "variant": (str,), "base_model": (str,), "quant_scheme": (str,), "dtype": (str,),
    "max_length": (int,), "template_version": (str,), "format_config": (dict,), "folds_file_hash": (str,),
    "cv_scores": (dict, list), "package_version": (str,), "created_at": (str,), "files": (dict,),
    "layout_version": (int,), "has_adapter": (bool,), "has_merged": (bool,), "dialect": (str,),
    BACKEND_FIELD: (str,),
}  # fmt: skip
# Written by save_artifact since layout 1; required on load so an ordering's parts cannot silently go missing.
LAYOUT_FIELDS: tuple[str, ...] = ("layout_version", "has_adapter", "has_merged")
# An abandoned staging folder (its saver died) is removed by the next save of the same artifact; one from the
# old naming (no pid in the name) only when older than this.
STALE_UNOWNED_STAGING_S = 24 * 3600.0
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
ENSEMBLE_KIND = "ensemble"  # manifest `kind` of an ensemble folder (`check_ensemble_manifest`)
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
    """Write `model` (a plain/quantized classifier, or a peft model whose adapter stays unmerged) as an artifact.

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
            "format_config": _plain(dataclasses.asdict(format_config)),
            "package_version": __version__,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "num_labels": int(inner.config.num_labels),
            "pad_token_id": int(inner.config.pad_token_id),
            "attn_implementation": inner.config._attn_implementation,
            "has_adapter": has_adapter,
            "has_merged": merged_model is not None,
            **_plain(manifest_fields),
        }
        manifest["files"] = _file_table(staging)
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
    """Save a classifier as a plain transformers checkpoint (config.json + model.safetensors), quantized layers
    included; for a peft model, only the frozen base (the adapter is saved by peft, unmerged).

    Written by hand because transformers 5 cannot always do it: `save_pretrained(state_dict=...)` ignores the
    given state dict for quantized models, and a model loaded from a pre-quantized bnb checkpoint fails to
    save again (its load-time conversion has no reverse). Here LoRA tensors are dropped, `base_layer.` and the
    head's `original_module.` unwrapped, and the config (with its quantization_config) saved beside.
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


def read_manifest_json(path: str | Path) -> dict:
    """A folder's manifest as it is (model or ensemble), unchecked beyond being a JSON object: to tell the two
    kinds apart before reading it with `read_manifest` or `read_ensemble_manifest`."""
    manifest_path, manifest = _manifest_json(Path(path))
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    return manifest


def _manifest_json(root: Path) -> tuple[Path, object]:
    """(path, parsed JSON) of the folder's manifest; an ArtifactError when it is missing or not JSON."""
    manifest_path = root / MANIFEST_NAME
    if not manifest_path.is_file():
        raise ArtifactError(f"{root} is not a complete artifact: {MANIFEST_NAME} is missing")
    try:
        return manifest_path, json.loads(manifest_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ArtifactError(f"{manifest_path}: not valid JSON ({error})") from error


def read_manifest(path: str | Path, verify_hashes: bool = False, allow_unlisted: bool = False) -> dict:
    """The artifact's manifest, checked: required fields present with their types, the ordering's parts
    consistent (`check_manifest_schema`), listed files present with their sizes (and sha256 with
    `verify_hashes`), no unlisted file in a folder that gets loaded (`allow_unlisted` is for readers that
    only ever touch the listed files, such as the upload), template version equal to the code's."""
    root = Path(path)
    manifest_path, manifest = _manifest_json(root)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{manifest_path}: expected a JSON object, got {type(manifest).__name__}")
    missing = [name for name in (*REQUIRED_FIELDS, *LAYOUT_FIELDS) if name not in manifest]
    if missing:
        raise ArtifactError(f"{manifest_path}: missing fields {missing}")
    if manifest.get("layout_version") != LAYOUT_VERSION:
        raise ArtifactError(
            f"{manifest_path}: layout_version {manifest.get('layout_version')} but this code reads {LAYOUT_VERSION}"
        )
    if manifest["template_version"] != TEMPLATE_VERSION:
        raise ArtifactError(
            f"{manifest_path}: trained with prompt template version {manifest['template_version']!r} but this code "
            f"formats with {TEMPLATE_VERSION!r}; predictions would be made on differently formatted text"
        )
    check_manifest_schema(manifest, manifest_path)
    files = manifest["files"]
    _check_listed_files(root, files, sizes=True, hashes=verify_hashes)
    for folder in (MODEL_DIR, ADAPTER_DIR, MERGED_DIR, TOKENIZER_DIR):
        if allow_unlisted or not (root / folder).is_dir():
            continue
        for file in sorted((root / folder).rglob("*")):
            relative = file.relative_to(root).as_posix()
            if (file.is_file() or file.is_symlink()) and relative not in files:
                raise ArtifactError(
                    f"{root}: file {relative} is not listed in the manifest; an unlisted file is never loaded"
                )
    if (root / ADAPTER_DIR).exists() and not manifest["has_adapter"]:
        raise ArtifactError(
            f"{manifest_path}: has_adapter is false but the artifact has an {ADAPTER_DIR}/ folder"
        )
    return manifest


def check_manifest_schema(manifest: dict, where: str | Path = MANIFEST_NAME) -> None:
    """Field types, the `files` table's entries, and what each ordering needs (one ArtifactError naming the
    field): ft-then-quant ships no adapter; quant-then-ft ships its adapter (`has_adapter` true and the
    adapter's files listed), unless the adapter is folded into group-wise INT4 weights (`int4_format`)."""
    for name, types in FIELD_TYPES.items():
        value = manifest.get(name)
        if name in manifest and (
            not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        ):
            wanted = " or ".join(t.__name__ for t in types)
            raise ArtifactError(f"{where}: field {name!r} must be {wanted}, got {value!r}")
    files = manifest["files"]
    if not files:
        raise ArtifactError(f"{where}: field 'files' lists no files")
    _check_file_entries(files, where)
    ordering = manifest["ordering"]
    if ordering not in ORDERINGS:
        raise ArtifactError(f"{where}: field 'ordering' must be one of {list(ORDERINGS)}, got {ordering!r}")
    listed = {
        folder: any(key.startswith(f"{folder}/") for key in files)
        for folder in (MODEL_DIR, ADAPTER_DIR, MERGED_DIR, TOKENIZER_DIR)
    }
    for folder in (MODEL_DIR, TOKENIZER_DIR):
        if not listed[folder]:
            raise ArtifactError(f"{where}: field 'files' lists nothing under {folder}/")
    if manifest["has_adapter"] != listed[ADAPTER_DIR]:
        raise ArtifactError(
            f"{where}: has_adapter is {manifest['has_adapter']} but 'files' lists "
            f"{'files' if listed[ADAPTER_DIR] else 'nothing'} under {ADAPTER_DIR}/"
        )
    if manifest["has_merged"] != listed[MERGED_DIR]:
        raise ArtifactError(
            f"{where}: has_merged is {manifest['has_merged']} but 'files' lists "
            f"{'files' if listed[MERGED_DIR] else 'nothing'} under {MERGED_DIR}/"
        )
    if ordering == "ft-then-quant" and manifest["has_adapter"]:
        raise ArtifactError(
            f"{where}: ordering ft-then-quant ships the merged model, but has_adapter is true"
        )
    if ordering == "quant-then-ft" and not manifest["has_adapter"] and not manifest.get("int4_format"):
        raise ArtifactError(
            f"{where}: ordering quant-then-ft needs its adapter (has_adapter true and {ADAPTER_DIR}/ "
            f"listed); without it the untrained base and a random score head would predict"
        )


def _check_file_entries(files: dict, where: str | Path) -> None:
    """Each `files` entry a relative path inside the folder with {'bytes': int >= 0, 'sha256': 64 hex digits}."""
    for relative, info in files.items():
        parts = Path(relative).parts
        if not relative or Path(relative).is_absolute() or ".." in parts or "\\" in relative:
            raise ArtifactError(f"{where}: files entry {relative!r} is not a path inside the artifact")
        if (
            not isinstance(info, dict)
            or not isinstance(info.get("bytes"), int)
            or isinstance(info.get("bytes"), bool)
            or info["bytes"] < 0
            or not isinstance(info.get("sha256"), str)
            or not _SHA256_HEX.match(info["sha256"])
        ):
            raise ArtifactError(
                f"{where}: files entry {relative!r} must be {{'bytes': int >= 0, 'sha256': 64 hex "
                f"digits}}, got {info!r}"
            )


def _check_listed_files(root: Path, files: dict, sizes: bool, hashes: bool) -> None:
    """Every listed file present (and with `sizes` its byte count, with `hashes` its sha256): an ArtifactError
    naming the first file that is not."""
    for relative, info in files.items():
        file = root / relative
        if not file.is_file():
            raise ArtifactError(f"{root}: file {relative} listed in the manifest is missing")
        if sizes and file.stat().st_size != info["bytes"]:
            raise ArtifactError(
                f"{root}: file {relative} has {file.stat().st_size} bytes, manifest says {info['bytes']}"
            )
    for relative, info in files.items() if hashes else ():
        if file_sha256(root / relative) != info["sha256"]:
            raise ArtifactError(
                f"{root}: file {relative} does not match its sha256 in the manifest (altered or "
                f"corrupt; verify_hashes=False / --no-verify-hashes skips this check)"
            )


def read_ensemble_manifest(path: str | Path, verify_hashes: bool = False) -> dict:
    """An ensemble folder's manifest (`kind: ensemble`, what `ship.write_shipped` writes), checked as a
    self-contained artifact (`check_ensemble_manifest`); an ArtifactError naming the manifest or file else."""
    root = Path(path)
    manifest_path, manifest = _manifest_json(root)
    if not isinstance(manifest, dict) or manifest.get("kind") != ENSEMBLE_KIND:
        raise ArtifactError(f"{manifest_path}: not an ensemble manifest (kind {ENSEMBLE_KIND!r})")
    check_ensemble_manifest(root, manifest, verify_hashes=verify_hashes)
    return manifest


def check_ensemble_manifest(path: str | Path, manifest: dict, verify_hashes: bool = True) -> None:
    """Refuse an ensemble that is not self-contained or not intact (one ArtifactError naming the manifest,
    member or file): `files` must list every file the folder holds (relative path -> bytes, sha256), every
    member's `path` must be relative and inside the folder, and each member's own files must be listed with
    the same bytes and sha256: a model member's `manifest.json` and every file it lists, a baseline member's
    JSON and its `<name>.manifest.json`. Every listed file must be present with its size and, with
    `verify_hashes`, its sha256 (all of them, member weights included: ~0.65-0.97 GB/s). Called by the upload
    (`kaggle_tools.upload`) and by `inference.ensemble_members` when a manifest has `files`."""
    root = Path(path)
    where = root / MANIFEST_NAME
    files = manifest.get("files")
    if not isinstance(files, dict):  # empty only when no member has files (class priors)
        raise ArtifactError(
            f"{where}: an ensemble artifact must list every file it holds in 'files' (its members "
            f"copied inside it, each file with bytes and sha256); ship it again with "
            f"ship.write_shipped"
        )
    _check_file_entries(files, where)
    members = manifest.get("members")
    if not isinstance(members, list) or not members:
        raise ArtifactError(f"{where}: field 'members' must be a non-empty list")
    named: list[tuple[int, str, str, str]] = []  # (index, name, kind, relative path)
    for index, member in enumerate(members):
        if not isinstance(member, dict):
            raise ArtifactError(f"{where}: members[{index}] must be an object, got {member!r}")
        name, relative = member.get("name", index), member.get("path")
        if not relative:
            continue  # a class prior: nothing on disk
        pure = PurePosixPath(str(relative))
        if pure.is_absolute() or ".." in pure.parts or "\\" in str(relative) or not pure.parts:
            raise ArtifactError(
                f"{where}: members[{index}] ({name}) path {relative!r} is not inside the ensemble "
                f"folder; moved or uploaded, the ensemble would lose it (ship.write_shipped copies "
                f"members in)"
            )
        kind = member.get("kind") or ("baseline" if pure.as_posix() in files else "model")
        named.append((index, str(name), kind, pure.as_posix()))
    _check_listed_files(root, files, sizes=True, hashes=False)
    for index, name, kind, relative in named:
        if kind == "model":
            member_manifest = _listed_member_manifest(root, where, index, name, relative, files)
            needed = {f"{relative}/{file}": info for file, info in member_manifest.get("files", {}).items()}
        else:
            needed = {relative: None, f"{relative}{BASELINE_MANIFEST_SUFFIX}": None}
        for file, info in needed.items():
            if file not in files:
                raise ArtifactError(
                    f"{where}: members[{index}] ({name}): file {file} is not listed in the ensemble's 'files'"
                )
            if info is not None and (files[file].get("bytes"), files[file].get("sha256")) != (
                info.get("bytes"),
                info.get("sha256"),
            ):
                raise ArtifactError(
                    f"{where}: members[{index}] ({name}): file {file} has other bytes/sha256 in "
                    f"the ensemble's 'files' than in the member's {MANIFEST_NAME}"
                )
    if verify_hashes:
        _check_listed_files(root, files, sizes=False, hashes=True)


def _listed_member_manifest(
    root: Path, where: Path, index: int, name: str, relative: str, files: dict
) -> dict:
    """A model member's own manifest, which the ensemble's `files` must list (so its sha256 vouches for it)."""
    listed = f"{relative}/{MANIFEST_NAME}"
    if listed not in files:
        raise ArtifactError(
            f"{where}: members[{index}] ({name}): file {listed} is not listed in the ensemble's 'files'"
        )
    try:
        member_manifest = json.loads((root / listed).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ArtifactError(f"{root / listed}: not a readable manifest ({error})") from error
    if not isinstance(member_manifest, dict) or not isinstance(member_manifest.get("files"), dict):
        raise ArtifactError(f"{root / listed}: a member's manifest must have a 'files' table")
    return member_manifest


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
    `verify_hashes` (default) checks every listed file's sha256 first (~0.65-0.97 GB/s); False only checks sizes.
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
    model = backend.load_artifact(
        root, manifest, LoadOptions(device=device, dtype=dtype, dequantize=dequantize, use_merged=use_merged)
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
    files.update({f"{MERGED_DIR}/{name}": info for name, info in _file_table(target).items()})
    update_manifest(root, has_merged=True, files=files)
    return target


def update_manifest(path: str | Path, **fields) -> dict:
    """Add or replace manifest fields after the fact (e.g. CV scores measured on the saved artifact)."""
    root = Path(path)
    manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest.update(_plain(fields))
    atomic_write_bytes(root / MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest


def _compute_dtype_name(model: nn.Module) -> str:
    for param in model.parameters():
        if param.is_floating_point():
            return str(param.dtype).removeprefix("torch.")
    return "unknown"


def _file_table(root: Path) -> dict[str, dict]:
    return {
        str(file.relative_to(root)): {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        for file in sorted(root.rglob("*"))
        if file.is_file()
    }


def _plain(value: Any) -> Any:
    """JSON-ready copy: tuples -> lists, paths -> str, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value


def _restore_tuples(section_cls: type, values: dict) -> dict:
    known = {f.name for f in dataclasses.fields(section_cls)}
    unknown = set(values) - known
    if unknown:
        raise ArtifactError(f"manifest format_config has fields this code does not know: {sorted(unknown)}")
    return {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}
