"""Stratified K-fold grouped by normalised prompt text, saved to one parquet file that every stage reads.

Rows whose prompts normalise to the same text form one group, and a group never crosses folds (row-wise folds
leak near-duplicates). Usage: `folds = make_folds(train, FoldConfig(n_folds=5)); check_folds(folds, train)`.
"""

from __future__ import annotations

import hashlib
import unicodedata
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.model_selection import StratifiedGroupKFold

from kaggle_utils.core.config import CLASS_NAMES, FoldConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.fileio import atomic_write_parquet, file_sha256

FOLD_COLUMNS: tuple[str, str, str] = ("id", "fold", "group")
_MAX_IDS_IN_MESSAGE = 10


def prompt_group_key(turns: Sequence[str | None] | str | None) -> str:
    """Normalised prompt text: turns joined, Unicode NFKC, casefolded, whitespace collapsed, stripped
    ("Hello  World" and "hello world" are one question for leakage purposes)."""
    if turns is None:
        text = ""
    elif isinstance(turns, str):
        text = turns
    else:
        text = "\n".join(turn or "" for turn in turns)
    text = unicodedata.normalize("NFKC", text).casefold()
    return " ".join(text.split())


def prompt_group_id(turns: Sequence[str | None] | str | None) -> str:
    """Short stable hash of `prompt_group_key` (16 hex chars): what the folds file stores as `group`."""
    key = prompt_group_key(turns).encode("utf-8", errors="surrogatepass")
    return hashlib.blake2b(key, digest_size=8).hexdigest()


def group_ids(frame: pl.DataFrame) -> pl.Series:
    """The `group` value of every row of a parsed frame (column `prompt`: List(String))."""
    _require_columns(frame, ("id", "prompt"), "frame")
    return pl.Series(
        "group", [prompt_group_id(turns) for turns in frame["prompt"].to_list()], dtype=pl.String
    )


def make_folds(frame: pl.DataFrame, cfg: FoldConfig | None = None) -> pl.DataFrame:
    """Assign every row of a labelled frame to a fold; returns columns `id`, `fold` (Int32), `group` (String).

    StratifiedGroupKFold seeded by `cfg.seed`: the same data gives the same folds on any machine.
    """
    cfg = cfg or FoldConfig()
    _require_columns(frame, ("id", "prompt", "label"), "frame")
    if cfg.n_folds < 2:
        raise DataError(f"n_folds must be at least 2, got {cfg.n_folds}")
    missing_labels = frame.filter(pl.col("label").is_null())["id"]
    if len(missing_labels):
        raise DataError(
            f"cannot make folds: column 'label' is null for {len(missing_labels)} rows "
            f"(ids {_preview(missing_labels)}); folds need a labelled training frame"
        )
    _raise_on_duplicate_ids(frame["id"], "frame")
    groups = group_ids(frame)
    n_groups = groups.n_unique()
    if n_groups < cfg.n_folds:
        raise DataError(f"cannot make {cfg.n_folds} folds from {n_groups} distinct prompts")

    labels = frame["label"].to_numpy()
    splitter = StratifiedGroupKFold(n_splits=cfg.n_folds, shuffle=True, random_state=cfg.seed)
    fold_of_row = np.full(frame.height, -1, dtype=np.int32)
    with warnings.catch_warnings():
        # "least populated class has fewer members than n_splits" only matters for tiny frames; the fold
        # summary shows the balance anyway.
        warnings.filterwarnings("ignore", message="The least populated class", category=UserWarning)
        for fold, (_, valid_index) in enumerate(
            splitter.split(np.zeros(frame.height), labels, groups.to_numpy())
        ):
            fold_of_row[valid_index] = fold
    folds = pl.DataFrame({"id": frame["id"], "fold": pl.Series(fold_of_row, dtype=pl.Int32), "group": groups})
    check_folds(folds, frame)
    return folds


def check_folds(folds: pl.DataFrame, frame: pl.DataFrame | None = None) -> None:
    """Raise DataError if a group crosses folds, an id is duplicated, or (with `frame`) a frame id is missing.

    With `frame`, groups are recomputed from its prompts (catching folds made from other data); folds may
    cover more ids than the frame.
    """
    _require_columns(folds, FOLD_COLUMNS, "folds")
    for column in FOLD_COLUMNS:
        nulls = folds[column].null_count()
        if nulls:
            raise DataError(f"folds: column '{column}' has {nulls} null values")
    _raise_on_duplicate_ids(folds["id"], "folds")
    if (folds["fold"] < 0).any():
        raise DataError(
            f"folds: negative fold numbers for ids {_preview(folds.filter(pl.col('fold') < 0)['id'])}"
        )
    _raise_on_crossing_groups(folds, "folds")

    if frame is None:
        return
    _require_columns(frame, ("id", "prompt"), "frame")
    if frame.schema["id"] != folds.schema["id"]:
        raise DataError(
            f"folds: id dtype {folds.schema['id']} does not match the frame's id dtype {frame.schema['id']}"
        )
    joined = (
        frame.select("id")
        .with_columns(group=group_ids(frame))
        .join(folds.select("id", "fold"), on="id", how="left")
    )
    missing = joined.filter(pl.col("fold").is_null())["id"]
    if len(missing):
        raise DataError(f"folds: {len(missing)} ids of the frame have no fold (ids {_preview(missing)})")
    _raise_on_crossing_groups(joined, "folds (groups recomputed from the frame's prompts)")


def drop_folds(
    frame: pl.DataFrame, folds: pl.DataFrame, excluded: Sequence[int] | None, source: str
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """`frame` and `folds` without the rows of the `excluded` folds (a nested-fold teacher's data). Every
    excluded fold must exist and two folds must remain; `source` names the folds file in errors."""
    if not excluded:
        return frame, folds
    present = sorted(folds["fold"].unique().to_list())
    unknown = sorted(set(excluded) - set(present))
    if unknown:
        raise UsageError(f"{source}: excluded folds {unknown} are not in it (it has {present})")
    remaining = sorted(set(present) - set(excluded))
    if len(remaining) < 2:
        raise UsageError(
            f"{source}: excluding folds {sorted(excluded)} leaves {remaining}; cross-validation "
            "needs two folds or more"
        )
    kept = folds.filter(~pl.col("fold").is_in(list(excluded)))
    return frame.join(kept.select("id"), on="id", how="semi", maintain_order="left"), kept


def fold_summary(folds: pl.DataFrame, frame: pl.DataFrame | None = None) -> pl.DataFrame:
    """Per fold: rows, groups and (with a labelled frame) the share of each class, for reports."""
    summary = folds.group_by("fold").agg(rows=pl.len(), groups=pl.col("group").n_unique())
    if frame is not None and "label" in frame.columns:
        labelled = folds.join(frame.select("id", "label"), on="id", how="inner")
        shares = labelled.group_by("fold").agg(
            [
                (pl.col("label") == index).mean().round(4).alias(f"share_{name}")
                for index, name in enumerate(CLASS_NAMES)
            ]
        )
        summary = summary.join(shares, on="fold", how="left")
    return summary.sort("fold")


def save_folds(folds: pl.DataFrame, path: str | Path) -> str:
    """Check and write the folds parquet atomically; returns the file's sha256 (for artifact manifests)."""
    check_folds(folds)
    atomic_write_parquet(folds.select(FOLD_COLUMNS), path)
    return folds_file_hash(path)


def load_folds(path: str | Path) -> pl.DataFrame:
    """Read and check a folds file written by `save_folds`."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"folds file not found: {path}")
    try:
        folds = pl.read_parquet(path)
    except Exception as error:  # polars raises several error types for a damaged file
        raise DataError(f"folds file {path} is not a readable parquet file: {error}") from error
    try:
        check_folds(folds)
    except DataError as error:
        raise DataError(f"{path}: {error}") from error
    return folds


def folds_file_hash(path: str | Path) -> str:
    """sha256 of the folds file's bytes: recorded in manifests so a model's CV scores name their folds."""
    return file_sha256(path)


def _raise_on_crossing_groups(table: pl.DataFrame, what: str) -> None:
    crossing = (
        table.group_by("group")
        .agg(pl.col("fold").n_unique().alias("n_folds"), pl.col("id").first())
        .filter(pl.col("n_folds") > 1)
    )
    if crossing.height:
        raise DataError(
            f"{what}: {crossing.height} prompt groups span more than one fold "
            f"(e.g. the groups of ids {_preview(crossing['id'])})"
        )


def _raise_on_duplicate_ids(ids: pl.Series, what: str) -> None:
    duplicated = ids.filter(ids.is_duplicated()).unique(maintain_order=True)
    if len(duplicated):
        raise DataError(f"{what}: {len(duplicated)} ids appear more than once (ids {_preview(duplicated)})")


def _require_columns(frame: pl.DataFrame, columns: Sequence[str], what: str) -> None:
    missing = [column for column in columns if column not in frame.columns]
    if missing:
        raise DataError(f"{what}: missing columns {missing} (has {frame.columns})")


def _preview(ids: pl.Series) -> str:
    shown = ", ".join(str(value) for value in ids.head(_MAX_IDS_IN_MESSAGE).to_list())
    return shown + (", ..." if len(ids) > _MAX_IDS_IN_MESSAGE else "")
