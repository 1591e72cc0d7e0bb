"""WSDM Cup (multilingual Chatbot Arena) dialect: plain-string parquet, `winner` model_a | model_b, accuracy.

The classifier keeps its three outputs (trained on labels 0/1 only; the tie output learns to stay near zero),
so every ordering, the artifact layout and swap TTA stay unchanged. The submission takes the larger of the A
and B probabilities (`ab_winners`); exactly equal A and B (e.g. a uniform fallback) go to `model_a`, counted.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.core.errors import SubmissionError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.data.dialect_base import LOG_LOSS, Dialect, Metric
from kaggle_utils.data.labels import parse_winner_labels
from kaggle_utils.data.sample import generate_wsdm_files
from kaggle_utils.data.submission import (
    SubmissionReport,
    check_ids,
    id_column_problems,
    read_submission_table,
    read_test_ids,
    repair_probabilities,
)

TIE_RULE = "equal A and B probabilities -> model_a"

WSDM_WINNER_VALUES: tuple[str, str] = ("model_a", "model_b")

_SHOWN = 10


def ab_winners(probs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class index per row (0 = A, 1 = B) from (n, 3) probabilities, and which rows were exact ties.

    B wins where its probability is larger than A's; the tie column is ignored (WSDM has no tie answer); an
    exact equality goes to A (`TIE_RULE`): one deterministic rule, counted by the writer."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(LABEL_COLUMNS):
        raise ValueError(f"probs must have shape (n, {len(LABEL_COLUMNS)}), got {probs.shape}")
    tied = probs[:, 1] == probs[:, 0]
    return (probs[:, 1] > probs[:, 0]).astype(np.int64), tied


def _check_ab_labels(labels: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != (n,):
        raise ValueError(f"labels must have shape ({n},), got {labels.shape}")
    if n == 0:
        raise ValueError("a metric of zero rows is undefined")
    if not np.all(np.isin(labels, (0, 1))):
        raise ValueError("labels must be 0 (model_a) or 1 (model_b): this metric has no tie class")
    return labels.astype(np.int64)


def ab_accuracy(labels: np.ndarray, probs: np.ndarray) -> float:
    """WSDM's categorization accuracy of the written `winner` (exactly `ab_winners`, ties to A)."""
    winners, _ = ab_winners(probs)
    labels = _check_ab_labels(labels, len(winners))
    return float(np.mean(winners == labels))


def ab_log_loss(labels: np.ndarray, probs: np.ndarray) -> float:
    """Binary log loss over A/B only: A and B clipped to [eps, 1 - eps] and renormalised to sum to one (the
    tie probability is dropped, as the submission drops it). A secondary, smoother number than accuracy."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] != len(LABEL_COLUMNS):
        raise ValueError(f"probs must have shape (n, {len(LABEL_COLUMNS)}), got {probs.shape}")
    labels = _check_ab_labels(labels, probs.shape[0])
    if not np.all(np.isfinite(probs)):
        raise ValueError("probs contain NaN or infinity")
    eps = np.finfo(np.float64).eps
    pair = np.clip(probs[:, :2], eps, 1 - eps)
    pair /= pair.sum(axis=1, keepdims=True)
    return float(-np.mean(np.log(pair[np.arange(len(labels)), labels])))


ACCURACY = Metric("accuracy", ab_accuracy, higher_is_better=True)

AB_LOG_LOSS = Metric("ab_log_loss", ab_log_loss, higher_is_better=False)


class WsdmDialect(Dialect):
    """WSDM Cup - Multilingual Chatbot Arena: plain-string parquet, `winner` = model_a | model_b, accuracy,
    submission `id, winner`."""

    name = "wsdm"
    description = "WSDM Cup multilingual: plain-string parquet, A/B only, accuracy, submission id,winner"
    slugs = ("wsdm-cup-multilingual-chatbot-arena",)
    train_file = "train.parquet"
    test_file = "test.parquet"
    label_columns = ("winner",)
    classes = ("model_a", "model_b")
    text_layout = "plain"
    optional_columns = ("model_a", "model_b", "language", "scored")  # scored: test only, kept as text
    metric = ACCURACY
    secondary_metrics = (AB_LOG_LOSS, LOG_LOSS)
    submission_columns = ("id", "winner")

    def parse_labels(self, raw: pl.DataFrame, ids: list[Any], path: Path) -> list[int]:
        return parse_winner_labels(
            raw, ids, path, "winner", dict(zip(WSDM_WINNER_VALUES, (0, 1), strict=True))
        )

    def write(self, ids, probs, path, expected_ids=None, fallback_prior=None):
        """`id, winner` with model_a / model_b from `ab_winners`; unusable rows are replaced by the fallback
        prior (or uniform, then decided by the tie rule) and counted, exact ties counted."""
        path = Path(path)
        ids_series = check_ids(ids, path, len(LABEL_COLUMNS), probs, expected_ids)
        repaired = repair_probabilities(probs, path, fallback_prior)
        winners, tied = ab_winners(repaired.probs)
        table = pl.DataFrame({"id": ids_series, "winner": np.asarray(WSDM_WINNER_VALUES)[winners].tolist()})
        buffer = io.BytesIO()
        table.write_csv(buffer)
        atomic_write_bytes(path, buffer.getvalue())
        unusable = repaired.fallback_mask
        return SubmissionReport(
            path=str(path),
            rows=table.height,
            renormalised_rows=repaired.renormalised_rows,
            fallback_rows=int(unusable.sum()),
            fallback=repaired.fallback_name if unusable.any() else "",
            fallback_ids=ids_series.filter(pl.Series(unusable)).head(_SHOWN).to_list(),
            tied_rows=int(tied.sum()),
            tie_rule=TIE_RULE if tied.any() else "",
        )

    def validate(self, path, test_path):
        """Header exactly `id, winner`; ids unique and the test file's set; every `winner` exactly model_a or
        model_b. All problems in one message, each with its field and the file's line numbers and ids."""
        table = read_submission_table(path, self.submission_columns)
        path = Path(path)
        problems: list[str] = []
        ids = table["id"].str.strip_chars()
        problems += id_column_problems(ids, read_test_ids(test_path))
        winner = table["winner"]
        bad = (~winner.is_in(list(WSDM_WINNER_VALUES))).fill_null(True)
        if bad.any():
            shown = [
                f"line {line} (id {row_id}): {value!r}"
                for line, row_id, value in zip(
                    _lines(bad), ids.filter(bad).to_list(), winner.filter(bad).to_list(), strict=True
                )
            ]
            problems.append(
                f"field 'winner': {int(bad.sum())} values not exactly "
                f"{' or '.join(WSDM_WINNER_VALUES)}: {_join(shown)}"
            )
        if problems:
            raise SubmissionError(f"{path}: " + "; ".join(problems))
        return SubmissionReport(path=str(path), rows=table.height)

    def generate_sample(self, out_dir, n_train, n_test, seed=0, traps=True):
        return generate_wsdm_files(out_dir, n_train=n_train, n_test=n_test, seed=seed, traps=traps)


def _lines(mask: pl.Series) -> list[int]:
    """1-based file line numbers (the header is line 1) where `mask` is true."""
    return [index + 2 for index in np.flatnonzero(mask.fill_null(False).to_numpy())]


def _join(values: Sequence) -> str:
    shown = ", ".join(str(value) for value in list(values)[:_SHOWN])
    return shown + (", ..." if len(values) > _SHOWN else "")
