"""The competition metric (Kaggle's multi-class log loss) and the out-of-fold (OOF) prediction store.

OOF predictions live in one parquet layout keyed by (`name`, `id`), with the fold each row was held out in;
the file's metadata records which folds a run never used (see docs/DESIGN_NOTES.md).
Usage: `save_oof(make_oof("m", ids, folds, probs, labels), "oof.parquet"); score_oof(load_oof(path), "m")`.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import polars as pl

from kaggle_utils.core.errors import DataError
from kaggle_utils.core.fileio import atomic_write_bytes, atomic_write_parquet

N_CLASSES = 3
PROB_COLUMNS: tuple[str, str, str] = ("p_a", "p_b", "p_tie")
OOF_COLUMNS: tuple[str, ...] = ("name", "id", "fold", *PROB_COLUMNS, "label")
OOF_RECORD_KEY = "kaggle_utils.oof_records"  # parquet key-value metadata: {name: exclusion record}


def log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Mean multi-class log loss with Kaggle's eps=auto: clip to [eps, 1-eps] (eps of the dtype), renormalise.

    `labels` are class indices 0..2 (A, B, tie); `probs` is (n, 3) in the same order (ints become float64).
    """
    return float(np.mean(row_log_losses(labels, probs)))


def row_log_losses(labels: np.ndarray, probs: np.ndarray) -> np.ndarray:
    """Each row's log loss, clipped as `log_loss` clips (its mean is `log_loss`): the paired differences
    behind every noise estimate (compare's decision, the ship decision, the QiD study, blends)."""
    labels = np.asarray(labels)
    probs = np.asarray(probs)
    if probs.ndim != 2 or probs.shape[1] != N_CLASSES:
        raise ValueError(f"probs must have shape (n, {N_CLASSES}), got {probs.shape}")
    if labels.shape != (probs.shape[0],):
        raise ValueError(f"labels must have shape ({probs.shape[0]},), got {labels.shape}")
    if probs.shape[0] == 0:
        raise ValueError("log loss of zero rows is undefined")
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or infinity")
    if np.any((labels < 0) | (labels >= N_CLASSES)) or not np.all(np.equal(np.mod(labels, 1), 0)):
        raise ValueError(f"labels must be class indices in 0..{N_CLASSES - 1}")
    dtype = probs.dtype if np.issubdtype(probs.dtype, np.floating) else np.dtype(np.float64)
    eps = np.finfo(dtype).eps
    clipped = np.clip(probs.astype(dtype, copy=False), eps, 1 - eps).astype(np.float64)
    clipped /= clipped.sum(axis=1, keepdims=True)
    return -np.log(clipped[np.arange(len(labels)), labels.astype(np.int64)])


def class_prior(labels: np.ndarray) -> np.ndarray:
    """Class frequencies (A, B, tie) of integer labels: the best constant prediction on that data."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=N_CLASSES).astype(np.float64)
    if counts.sum() == 0:
        raise ValueError("class prior of zero labels is undefined")
    return counts / counts.sum()


def prior_log_loss(labels: np.ndarray, prior: np.ndarray | None = None) -> float:
    """Log loss of predicting `prior` (default: the labels' own class frequencies) for every row."""
    labels = np.asarray(labels)
    prior = class_prior(labels) if prior is None else np.asarray(prior, dtype=np.float64)
    return log_loss(labels, np.tile(prior, (len(labels), 1)))


def uniform_log_loss(n_classes: int = N_CLASSES) -> float:
    """Log loss of predicting 1/n for every class: ln(3) = 1.0986 for this competition."""
    return float(np.log(n_classes))


@dataclass
class OofScore:
    """Scores of one OOF set: overall, per fold, and the two constant references on the same rows."""

    name: str
    rows: int
    log_loss: float
    per_fold: dict[int, float]
    prior_log_loss: float
    uniform_log_loss: float

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "rows": self.rows,
            "log_loss": self.log_loss,
            "per_fold": {str(fold): value for fold, value in self.per_fold.items()},
            "prior_log_loss": self.prior_log_loss,
            "uniform_log_loss": self.uniform_log_loss,
        }


def make_oof(name: str, ids, folds, probs: np.ndarray, labels) -> pl.DataFrame:
    """Build (and check) an OOF table from arrays in matching row order."""
    probs = np.asarray(probs, dtype=np.float64)
    ids_series = ids if isinstance(ids, pl.Series) else pl.Series(list(ids))
    if probs.shape != (len(ids_series), N_CLASSES):
        raise ValueError(f"probs must have shape ({len(ids_series)}, {N_CLASSES}), got {probs.shape}")
    oof = pl.DataFrame(
        {
            "name": pl.Series([name] * len(ids_series), dtype=pl.String),
            "id": ids_series.alias("id"),
            "fold": pl.Series(np.asarray(folds), dtype=pl.Int32),
            **{column: probs[:, index] for index, column in enumerate(PROB_COLUMNS)},
            "label": pl.Series(np.asarray(labels), dtype=pl.Int8),
        }
    )
    check_oof(oof)
    return oof


def check_oof(oof: pl.DataFrame, source: str = "oof") -> None:
    """Raise DataError for missing columns, nulls, non-finite or negative probabilities, or duplicate keys."""
    missing = [column for column in OOF_COLUMNS if column not in oof.columns]
    if missing:
        raise DataError(f"{source}: missing columns {missing}")
    for column in OOF_COLUMNS:
        if oof[column].null_count():
            raise DataError(f"{source}: column '{column}' has {oof[column].null_count()} null values")
    bad = oof.filter(pl.any_horizontal([~pl.col(c).is_finite() | (pl.col(c) < 0) for c in PROB_COLUMNS]))
    if bad.height:
        raise DataError(
            f"{source}: {bad.height} rows with non-finite or negative probabilities "
            f"(name/id {bad.select('name', 'id').head(5).rows()})"
        )
    duplicated = oof.filter(pl.struct("name", "id").is_duplicated())
    if duplicated.height:
        raise DataError(
            f"{source}: {duplicated.height} rows share a (name, id) key "
            f"(e.g. {duplicated.select('name', 'id').head(5).rows()})"
        )
    bad_labels = oof.filter((pl.col("label") < 0) | (pl.col("label") >= N_CLASSES))
    if bad_labels.height:
        raise DataError(
            f"{source}: labels outside 0..{N_CLASSES - 1} for ids {bad_labels['id'].head(5).to_list()}"
        )


def save_oof(
    oof: pl.DataFrame,
    path: str | Path,
    append: bool = True,
    replace: Literal["name_fold", "name"] = "name_fold",
    record: dict | None = None,
) -> Path:
    """Write OOF rows atomically; one file holds every model's OOF predictions (an id once per name).

    `append` keeps the file's other rows: `replace="name_fold"` replaces the same (name, fold), `"name"` every
    row of the names written. `record` (`exclusion_record`) is stored for each name written.
    """
    if replace not in ("name_fold", "name"):
        raise ValueError(f"replace must be 'name_fold' or 'name', got {replace!r}")
    check_oof(oof)
    path = Path(path)
    table = oof.select(OOF_COLUMNS)
    names = sorted(str(name) for name in table["name"].unique().to_list())
    records: dict[str, dict] = {}
    if append and path.exists():
        existing = load_oof(path)
        keys = ["name", "fold"] if replace == "name_fold" else ["name"]
        kept = existing.join(table.select(keys).unique(), on=keys, how="anti")
        if kept.height and kept.schema["id"] != table.schema["id"]:
            raise DataError(
                f"{path}: id dtype {kept.schema['id']} differs from the new rows' {table.schema['id']}"
            )
        kept_names = {str(name) for name in kept["name"].unique().to_list()}
        old_records = read_oof_records(path)
        records = {name: old for name, old in old_records.items() if name in kept_names and name not in names}
        # a name whose surviving rows came from a run with another record loses it (not one run any more)
        mixed = {name for name in names if name in kept_names and old_records.get(name) != record}
        table = pl.concat([kept, table], how="vertical")
        check_oof(table, source=f"{path} (existing rows plus the new ones)")
    else:
        mixed = set()
    if record is not None:
        records.update({name: record for name in names if name not in mixed})
    if not records:
        return atomic_write_parquet(table, path)
    return write_parquet_record(table, path, OOF_RECORD_KEY, records)


def fold_ids_sha256(ids: Iterable) -> str:
    """sha256 of ids as sorted text, one per line: the identity of the rows a fold holds (integer and string
    ids of the same value give the same digest)."""
    return hashlib.sha256("\n".join(sorted(str(value) for value in ids)).encode()).hexdigest()


def exclusion_record(
    folds: pl.DataFrame, excluded: Sequence[int] | None, folds_sha256: str | None = None
) -> dict:
    """The record `save_oof` stores for a run that never used the `excluded` folds; `folds` is the whole
    (id, fold) table before `drop_folds`, `folds_sha256` the folds file's digest (provenance only)."""
    entries = {}
    for fold in sorted({int(fold) for fold in excluded or ()}):
        ids = folds.filter(pl.col("fold") == fold)["id"]
        entries[str(fold)] = {"rows": len(ids), "ids_sha256": fold_ids_sha256(ids.to_list())}
    return {"excluded_folds": entries, "folds_sha256": folds_sha256}


def read_oof_records(path: str | Path) -> dict[str, dict]:
    """{name: exclusion record} from an OOF parquet's metadata; {} when it has none."""
    records = read_parquet_record(path, OOF_RECORD_KEY)
    return records if records is not None else {}


def write_parquet_record(frame: pl.DataFrame, path: str | Path, key: str, record) -> Path:
    """Write `frame` as parquet with `record` (JSON-able) in its key-value metadata under `key`, atomically:
    the rows and the record are one file, replaced in one rename."""
    buffer = io.BytesIO()
    frame.write_parquet(buffer, metadata={key: json.dumps(record, sort_keys=True)})
    return atomic_write_bytes(path, buffer.getvalue())


def read_parquet_record(path: str | Path, key: str):
    """The JSON value `write_parquet_record` stored under `key` (None when the file has no such entry); an
    unreadable file or a value that is not JSON is a DataError naming the file."""
    try:
        metadata = pl.read_parquet_metadata(path)
    except Exception as error:  # noqa: BLE001 - any unreadable file gets the same one-line message
        raise DataError(f"{path}: not a readable parquet file ({type(error).__name__}: {error})") from None
    if key not in metadata:
        return None
    try:
        return json.loads(metadata[key])
    except ValueError as error:
        raise DataError(f"{path}: its {key} metadata is not JSON ({error})") from None


def load_oof(path: str | Path, name: str | None = None) -> pl.DataFrame:
    """Read an OOF file (optionally one `name`), checked."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"OOF file not found: {path}")
    oof = pl.read_parquet(path)
    check_oof(oof, source=str(path))
    if name is not None:
        oof = oof.filter(pl.col("name") == name)
        if oof.is_empty():
            raise DataError(f"{path}: no OOF rows named {name!r}")
    return oof


def oof_probs(oof: pl.DataFrame) -> np.ndarray:
    """(n, 3) float64 probabilities of an OOF table, in its row order."""
    return oof.select(PROB_COLUMNS).to_numpy().astype(np.float64)


def score_oof(oof: pl.DataFrame, name: str | None = None) -> OofScore:
    """Overall and per-fold log loss of one OOF set, with class-prior and uniform references on its rows."""
    if name is not None:
        oof = oof.filter(pl.col("name") == name)
    names = oof["name"].unique().to_list()
    if len(names) != 1:
        raise ValueError(f"score_oof needs exactly one name, found {sorted(names)}; pass name=")
    labels = oof["label"].to_numpy()
    per_fold = {
        int(fold): log_loss(part["label"].to_numpy(), oof_probs(part))
        for (fold,), part in sorted(oof.partition_by("fold", as_dict=True).items())
    }
    return OofScore(
        name=names[0],
        rows=oof.height,
        log_loss=log_loss(labels, oof_probs(oof)),
        per_fold=per_fold,
        prior_log_loss=prior_log_loss(labels),
        uniform_log_loss=uniform_log_loss(),
    )
