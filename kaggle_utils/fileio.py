"""Atomic file writes: a reader sees either the old file or the complete new one, never a half-written file.

Kaggle scores whatever `submission.csv` exists when the notebook stops, and training/evaluation read the same
folds file; a crash or a time-out in the middle of a write must not leave a truncated file at the real path.
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from pathlib import Path

import polars as pl


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to a temp file in the target's directory, fsync it, then `os.replace` it onto `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - closed explicitly before the rename
        mode="wb", dir=path.parent, prefix=f".{path.name}.", suffix=".tmp", delete=False
    )
    temp_path = Path(handle.name)
    try:
        with handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp_path, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            temp_path.unlink()
        raise
    _fsync_directory(path.parent)
    return path


def atomic_write_parquet(frame: pl.DataFrame, path: str | Path) -> Path:
    """Serialise `frame` to parquet in memory, then write it atomically."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    return atomic_write_bytes(path, buffer.getvalue())


def _fsync_directory(directory: Path) -> None:
    """Make the rename itself durable where the OS allows opening a directory (POSIX); best effort elsewhere."""
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
