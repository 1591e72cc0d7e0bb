"""What `upload-artifact` sends: an explicit list of files, never "whatever is in the folder".

`plan_upload` picks an artifact's manifest files, a build-wheels folder's files, or `include` matches, and
refuses the upload when a credential-looking file is among them:

    plan = plan_upload(folder)
    print(plan.summary())  # every file sent, then every file left out
    stage_upload(plan, staging)  # exactly those files, in the folder the kaggle client is given
"""

from __future__ import annotations

import fnmatch
import json
import re
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from kaggle_utils.core.errors import ArtifactError, UsageError
from kaggle_utils.core.fileio import check_output_apart, file_sha256, link_or_copy
from kaggle_utils.kaggle.metadata import DATASET_METADATA_FILE
from kaggle_utils.kaggle.wheels import MANIFEST_FILE as WHEELS_MANIFEST
from kaggle_utils.kaggle.wheels import REQUIREMENTS_FILE
from kaggle_utils.quant.layout import MANIFEST_NAME
from kaggle_utils.quant.manifest import ENSEMBLE_KIND, read_ensemble_manifest, read_manifest

ARTIFACT_MANIFEST = MANIFEST_NAME  # the artifact's manifest (kaggle_utils.quant.layout)
# File names (any path component) that hold credentials in the usual tools' layouts.
CREDENTIAL_NAMES: tuple[str, ...] = (
    ".env",
    ".env.*",
    "*.env",
    "kaggle.json",
    "access_token",
    "access_token.txt",
    "*.pem",
    "id_rsa*",
    "id_ed25519*",
    ".netrc",
    "credentials*",
    ".git-credentials",
)
CREDENTIAL_DIRS: tuple[str, ...] = (".kaggle", ".ssh", ".aws")
SNIFF_MAX_BYTES = 64 * 1024
# A legacy Kaggle key is 32 hex digits; an API token starts with KGAT_.
CREDENTIAL_CONTENT = re.compile(
    rb'"key"\s*:\s*"[0-9a-fA-F]{32}"|KGAT_[0-9A-Za-z_]{16,}|KAGGLE_(?:KEY|API_TOKEN)\s*[=:]\s*["\']?[0-9A-Za-z_]{16,}'
)


@dataclass
class UploadPlan:
    """The files to send (relative posix path -> bytes) and those left out, for one folder."""

    directory: Path
    kind: str  # "artifact", "ensemble", "wheels" or "include"
    files: dict[str, int] = field(default_factory=dict)
    left_out: dict[str, int] = field(default_factory=dict)
    credential_like_left_out: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(self.files.values())

    def summary(self) -> str:
        """Every file sent (path + bytes), then every file left out: nothing leaves the machine unlisted."""
        lines = [
            f"sending {len(self.files)} files ({self.total_bytes:,} bytes) from {self.directory} "
            f"({self.kind}):"
        ]
        lines += [f"  {path}  {size:,} bytes" for path, size in self.files.items()]
        if self.left_out:
            lines.append(f"left out (not sent): {len(self.left_out)} files")
            for path, size in self.left_out.items():
                flag = "  [credential-looking]" if path in self.credential_like_left_out else ""
                lines.append(f"  {path}  {size:,} bytes{flag}")
        return "\n".join(lines)


def is_credential_name(relative: str) -> bool:
    """True for a path whose file name (or a folder on the way) is where credentials are usually kept."""
    parts = PurePosixPath(relative).parts
    if any(part in CREDENTIAL_DIRS for part in parts[:-1]):
        return True
    name = parts[-1].lower()
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in CREDENTIAL_NAMES)


def holds_credential(path: Path) -> bool:
    """Cheap content sniff: a small file containing a Kaggle-looking key or token."""
    try:
        if path.stat().st_size > SNIFF_MAX_BYTES:
            return False
        return CREDENTIAL_CONTENT.search(path.read_bytes()) is not None
    except OSError:
        return False


def _all_files(directory: Path) -> dict[str, int]:
    files = {}
    for path in sorted(directory.rglob("*")):
        if path.is_file() or path.is_symlink():
            relative = path.relative_to(directory).as_posix()
            if relative != DATASET_METADATA_FILE:  # the client reads it as metadata, it is not a data file
                files[relative] = path.stat().st_size if path.exists() else 0
    return files


def _safe_relative(directory: Path, relative: str, source: str) -> str:
    pure = PurePosixPath(relative)
    if pure.is_absolute() or ".." in pure.parts or not pure.parts:
        raise ArtifactError(f"{directory / source}: listed path {relative!r} is not inside the folder")
    return pure.as_posix()


def _manifest_kind(directory: Path) -> str | None:
    """The manifest's `kind` (ensemble), or None (a model artifact; an unreadable manifest is reported by its
    reader)."""
    try:
        manifest = json.loads((directory / ARTIFACT_MANIFEST).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return manifest.get("kind") if isinstance(manifest, dict) else None


def _artifact_files(directory: Path) -> tuple[str, list[str]]:
    # every listed file present, sizes and sha256 match; unlisted files are left out, not refused
    if _manifest_kind(directory) == ENSEMBLE_KIND:
        kind, manifest = "ensemble", read_ensemble_manifest(directory, verify_hashes=True)
    else:
        kind, manifest = "artifact", read_manifest(directory, verify_hashes=True, allow_unlisted=True)
    listed = [_safe_relative(directory, name, ARTIFACT_MANIFEST) for name in manifest["files"]]
    return kind, sorted(set(listed) | {ARTIFACT_MANIFEST})


def _wheels_files(directory: Path, available: dict[str, int]) -> list[str]:
    manifest_path = directory / WHEELS_MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8") or "{}")
    except json.JSONDecodeError as error:
        raise UsageError(f"{manifest_path}: not valid JSON ({error})") from None
    wheels = sorted(name for name in available if "/" not in name and name.endswith(".whl"))
    listed = manifest.get("wheels") if isinstance(manifest, dict) else None
    if isinstance(listed, dict) and listed:
        if sorted(listed) != wheels:
            raise UsageError(
                f"{manifest_path}: lists wheels {sorted(listed)} but the folder has {wheels}; rerun "
                "build-wheels"
            )
        for name, digest in listed.items():
            if file_sha256(directory / name) != digest:
                raise UsageError(
                    f"{directory / name}: does not match its sha256 in {WHEELS_MANIFEST}; rerun build-wheels"
                )
    extras = [name for name in (REQUIREMENTS_FILE, WHEELS_MANIFEST) if name in available]
    return sorted(wheels + extras)


def _included_files(directory: Path, available: dict[str, int], include: list[str]) -> list[str]:
    chosen: set[str] = set()
    for pattern in include:
        matched = [name for name in available if fnmatch.fnmatchcase(name, pattern.strip("/"))]
        if not matched:
            raise UsageError(f"{directory}: --include {pattern!r} matches no file")
        chosen.update(matched)
    return sorted(chosen)


def plan_upload(directory: str | Path, include: list[str] | None = None) -> UploadPlan:
    """The exact files `upload-artifact` would send from `directory`; raises UsageError (nothing sent) when a
    credential-looking file is among them, or the folder's own listing disagrees with its files."""
    directory = Path(directory)
    available = _all_files(directory)
    if (directory / ARTIFACT_MANIFEST).is_file():
        if include:
            raise UsageError(
                f"{directory}: an artifact uploads exactly what its {ARTIFACT_MANIFEST} lists; drop --include"
            )
        kind, selected = _artifact_files(directory)
    elif include:
        kind, selected = "include", _included_files(directory, available, include)
    elif (directory / WHEELS_MANIFEST).is_file():
        kind, selected = "wheels", _wheels_files(directory, available)
    else:
        raise UsageError(
            f"{directory}: neither an artifact ({ARTIFACT_MANIFEST}) nor a build-wheels folder "
            f"({WHEELS_MANIFEST}); "
            "name the files to send with --include PATTERN"
        )
    if not selected:
        raise UsageError(f"{directory}: nothing to upload")
    plan = UploadPlan(directory, kind)
    refused = []
    for relative in selected:
        path = directory / relative
        target = path.resolve()
        if is_credential_name(relative) or (path.is_symlink() and is_credential_name(target.name)):
            refused.append(f"{relative} (credential-looking name)")
        elif not target.is_relative_to(directory.resolve()):
            refused.append(f"{relative} (a link to {target}, outside the folder)")
        elif holds_credential(path):
            refused.append(f"{relative} (contains a Kaggle-looking key or token)")
        plan.files[relative] = available.get(relative, path.stat().st_size)
    if refused:
        raise UsageError(
            f"{directory}: refusing to upload, credential-looking files would be sent: {', '.join(refused)}; "
            "nothing was sent"
        )
    plan.left_out = {name: size for name, size in available.items() if name not in plan.files}
    plan.credential_like_left_out = [name for name in plan.left_out if is_credential_name(name)]
    return plan


def stage_upload(plan: UploadPlan, staging: Path) -> Path:
    """Hard-link (or copy, across file systems) exactly the planned files into `staging`, same layout. A
    `staging` that is, contains or lies inside the folder to upload is refused (UsageError) before anything is
    linked: it would write into what is being sent."""
    check_output_apart(staging, [("folder to upload", plan.directory)])
    for relative in plan.files:
        link_or_copy((plan.directory / relative).resolve(), staging / relative)
    return staging
