"""Label columns of a competition file -> class indices (0 = A, 1 = B, 2 = tie), or a DataError naming the
file, the column and the first bad rows. Used by the dialects (`parse_labels`) that `data.load` calls.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.core.errors import DataError

WSDM_LABEL_COLUMN = "winner"
WSDM_WINNERS: dict[str, int] = {"model_a": 0, "model_b": 1}
MAX_EXAMPLES = 10  # example ids kept per repair kind / observation


def parse_winner_labels(
    raw: pl.DataFrame,
    ids: list[Any],
    path: Path,
    column: str = WSDM_LABEL_COLUMN,
    winners: dict[str, int] | None = None,
) -> list[int]:
    """One categorical winner column (WSDM: `winner` = model_a | model_b) -> class indices; else DataError."""
    winners = WSDM_WINNERS if winners is None else winners
    winner = raw[column].cast(pl.String)
    bad = (~winner.is_in(list(winners))).fill_null(True)
    if bad.any():
        rows = bad.arg_true().head(MAX_EXAMPLES).to_list()
        examples = [(ids[r], winner[r]) for r in rows]
        raise DataError(
            f"{path}: column '{column}' must be one of {' / '.join(repr(k) for k in winners)}; "
            f"{int(bad.sum())} bad row(s), "
            f"(id, value): {examples}"
        )
    return winner.replace_strict(winners, return_dtype=pl.Int8).to_list()


def parse_one_hot_labels(
    raw: pl.DataFrame, ids: list[Any], path: Path, columns: Sequence[str] = LABEL_COLUMNS
) -> list[int]:
    """One-hot winner columns (LMSYS: A, B, tie) -> class index = the column holding the 1; else DataError."""
    columns = list(columns)
    values = raw.select(
        [pl.col(c).cast(pl.String).str.strip_chars().cast(pl.Float64, strict=False).alias(c) for c in columns]
    )
    is_binary = pl.all_horizontal([pl.col(c).is_in([0.0, 1.0]).fill_null(False) for c in columns])
    bad = values.select(~is_binary | (pl.sum_horizontal(columns) != 1.0)).to_series()
    if bad.any():
        rows = bad.arg_true().head(MAX_EXAMPLES).to_list()
        originals = raw.select(columns)
        examples = ", ".join(f"id {ids[r]}: {tuple(originals.row(r))}" for r in rows)
        raise DataError(
            f"{path}: columns {', '.join(columns)} must be one-hot "
            "(each 0 or 1, exactly one 1 per row); "
            f"{int(bad.sum())} bad row(s): {examples}" + (" ..." if bad.sum() > len(rows) else "")
        )
    return np.argmax(values.to_numpy(), axis=1).tolist()
