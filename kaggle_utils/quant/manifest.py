"""An artifact's `manifest.json`: read it, check its fields and files, update it; ensemble manifests too.

Fields: ordering, variant, base_model, quant_scheme, dtype, max_length, template_version, format_config,
folds_file_hash, cv_scores, class_prior, package_version, created_at, files (relative path -> bytes, sha256),
layout_version, quant_backend, num_labels, pad_token_id, has_adapter, has_merged, and the caller's extras.
An ensemble folder (`kind: ensemble`, `ship.write_shipped`) lists its members copied inside it and every file
it holds; `check_ensemble_manifest` checks it is self-contained and intact.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath
from typing import Any

from kaggle_utils.core.errors import ArtifactError
from kaggle_utils.core.fileio import atomic_write_bytes, file_sha256
from kaggle_utils.quant.layout import (
    ADAPTER_DIR,
    BACKEND_FIELD,
    LAYOUT_VERSION,
    MANIFEST_NAME,
    MERGED_DIR,
    MODEL_DIR,
    TOKENIZER_DIR,
)
from kaggle_utils.text.template import TEMPLATE_VERSION
from kaggle_utils.train.baseline import MANIFEST_SUFFIX as BASELINE_MANIFEST_SUFFIX

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

_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")

ENSEMBLE_KIND = "ensemble"  # manifest `kind` of an ensemble folder (`check_ensemble_manifest`)


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
            f"{manifest_path}: layout_version {manifest.get('layout_version')} but this code reads "
            f"{LAYOUT_VERSION}"
        )
    if manifest["template_version"] != TEMPLATE_VERSION:
        raise ArtifactError(
            f"{manifest_path}: trained with prompt template version {manifest['template_version']!r} but "
            f"this code formats with {TEMPLATE_VERSION!r}; predictions would be made on differently "
            f"formatted text"
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
    """Each `files` entry: a relative path inside the folder -> {'bytes': int >= 0, 'sha256': 64 hex}."""
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
    member or file): `files` lists every file the folder holds, each member lies inside the folder with its
    own files listed alike, every listed file is present with its size and, with `verify_hashes`, sha256."""
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
    """A model member's own manifest, which the ensemble's `files` must list (its sha256 vouches for it)."""
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


def update_manifest(path: str | Path, **fields) -> dict:
    """Add or replace manifest fields after the fact (e.g. CV scores measured on the saved artifact)."""
    root = Path(path)
    manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
    manifest.update(json_ready(fields))
    atomic_write_bytes(root / MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))
    return manifest


def file_table(root: Path) -> dict[str, dict]:
    return {
        str(file.relative_to(root)): {"bytes": file.stat().st_size, "sha256": file_sha256(file)}
        for file in sorted(root.rglob("*"))
        if file.is_file()
    }


def json_ready(value: Any) -> Any:
    """JSON-ready copy: tuples -> lists, paths -> str, numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 1) == 0:
        return value.item()
    if hasattr(value, "tolist"):
        return value.tolist()
    return value
