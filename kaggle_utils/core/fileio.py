"""Atomic file writes: a reader sees either the old file or the complete new one, never a half-written file.

Kaggle scores whatever `submission.csv` exists when the notebook stops, and training/evaluation read the same
folds file; a crash or a time-out in the middle of a write must not leave a truncated file at the real path.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable
from pathlib import Path

import polars as pl

from kaggle_utils.core.errors import UsageError


class WriteError(UsageError, OSError):
    """An output that cannot be written (no permission, a file where a folder should be, not a regular
    file): a UsageError (the CLI prints one line) and an OSError (callers catching OSError still do)."""


def check_output_target(path: str | Path) -> Path:
    """Refuse a target that `os.replace` must not replace: a symlink, device, FIFO or folder (a missing path
    or a regular file is fine)."""
    path = Path(path)
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return path
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror or error}") from error
    if not stat.S_ISREG(info.st_mode):
        kind = (
            "a symlink"
            if stat.S_ISLNK(info.st_mode)
            else "a folder"
            if stat.S_ISDIR(info.st_mode)
            else "not a regular file (device, FIFO or socket)"
        )
        raise WriteError(f"refusing to write {path}: it is {kind}; give the path of a regular file")
    return path


def check_not_an_input(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output that resolves to one of the inputs (or lies inside an input folder): writing it would
    destroy what is being read. `inputs` are (what, path) pairs; None paths are skipped."""
    target = Path(os.path.realpath(output))
    for what, path in inputs:
        if path is None:
            continue
        source = Path(os.path.realpath(path))
        if target == source or (source.is_dir() and source in target.parents):
            where = "is" if target == source else "is inside"
            raise UsageError(f"refusing to write {output}: it {where} the {what} {path}")


def check_output_apart(output: str | Path, inputs: Iterable[tuple[str, str | Path | None]]) -> None:
    """Refuse an output (file or folder) that is, contains, or lies inside any input (file or folder).

    Call it before anything is read or written; `inputs` are (what, path) pairs, None paths skipped.
    """
    target = Path(os.path.realpath(output))
    for what, path in inputs:
        if path is None:
            continue
        source = Path(os.path.realpath(path))
        if target == source:
            relation = "is"
        elif target in source.parents:
            relation = "contains"
        elif source in target.parents:
            relation = "is inside"
        else:
            continue
        raise UsageError(
            f"refusing to write {output}: it {relation} the {what} {path}; choose another output"
        )


def link_or_copy(source: str | Path, target: str | Path) -> None:
    """Hard-link `source` at `target` (parents created), or copy it where the file system cannot link: the
    cheap way to stage files that are only read afterwards (never edit a staged file in place)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:
        shutil.copy2(source, target)


def _new_file_mode() -> int:
    """0o666 minus the process umask: the mode `open()` gives a new file (tempfile's own is 0o600).

    Linux reports the umask in /proc without changing it; elsewhere it is read by setting and restoring it."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return 0o666 & ~int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return 0o666 & ~mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temp file beside `path`, fsync it, then `os.replace` it onto `path`.

    The file gets the mode a plain `open()` would give; a failed write raises `WriteError` and leaves the
    previous file as it was."""
    path = check_output_target(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed explicitly before the rename
            mode="wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
        )
    except OSError as error:
        raise WriteError(f"cannot write {path}: {error.strerror or error}") from error
    temp_path = Path(handle.name)
    try:
        with handle:
            try:
                mode = stat.S_IMODE(os.stat(path).st_mode)
            except FileNotFoundError:
                mode = _new_file_mode()
            os.fchmod(handle.fileno(), mode)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException as error:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()
        if isinstance(error, OSError) and not isinstance(error, WriteError):
            kept = "the previous file is intact" if path.exists() else "nothing was written"
            raise WriteError(f"cannot write {path}: {error.strerror or error} ({kept})") from error
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_parquet(frame: pl.DataFrame, path: str | Path) -> Path:
    """Serialise `frame` to parquet in memory, then write it atomically."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _fsync_directory(directory: Path) -> None:
    """Make the rename durable where the OS allows opening a directory (POSIX); best effort elsewhere."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes, read in 1 MiB blocks (artifacts, folds, wheels and GGUF files are large)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
