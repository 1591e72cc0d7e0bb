"""Competition dialects: everything that differs between the Chatbot Arena competitions, in one object each.

The pipeline (folds, formatting, training, quantization, the inference engine) is the same for every
competition of this family: a pair of responses to one prompt, a 3-class classifier (A, B, tie) whose
probabilities are always (n, 3) in that order. What differs is at the edges: how the files are laid out
(JSON-list CSV or plain-string parquet), which label columns hold the answer, the metric, and the submission
file. A `Dialect` owns exactly those; everything else asks it (`get_dialect(name)`), and an artifact's manifest
records its dialect's name so `predict` writes the file its competition expects.

A new competition format is one subclass here plus `register_dialect(...)`: its label parsing (with the
helpers of `data.py`), metric, writer and validator.

WSDM Cup (binary A/B, accuracy): the classifier is kept as is (three outputs, trained on labels 0/1 only; the
tie output learns to stay near zero, and keeping one model shape keeps every ordering, the artifact layout and
swap TTA unchanged). The submission takes the larger of the A and B probabilities (`ab_winners`); the tie
probability is ignored, and rows whose A and B probabilities are exactly equal (e.g. a uniform fallback) are
decided by one fixed rule, counted in the report: `model_a`.
"""

from __future__ import annotations

import io
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS, DataConfig
from kaggle_utils.core.errors import SubmissionError, UsageError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.core.metrics import log_loss
from kaggle_utils.data.labels import parse_one_hot_labels, parse_winner_labels
from kaggle_utils.data.sample import generate_competition_files, generate_wsdm_files
from kaggle_utils.data.submission import (
    SubmissionReport,
    check_ids,
    id_column_problems,
    read_submission_table,
    read_test_ids,
    repair_probabilities,
    validate_submission,
    write_submission,
)

TIE_RULE = "equal A and B probabilities -> model_a"
WSDM_WINNER_VALUES: tuple[str, str] = ("model_a", "model_b")
DEFAULT_DIALECT = "lmsys"  # manifests written before dialects existed are LMSYS artifacts
_SHOWN = 10


@dataclass(frozen=True)
class Metric:
    """A competition metric over class-index labels and (n, 3) probabilities (A, B, tie)."""

    name: str
    function: Callable[[np.ndarray, np.ndarray], float]
    higher_is_better: bool

    def __call__(self, labels: np.ndarray, probs: np.ndarray) -> float:
        return float(self.function(np.asarray(labels), np.asarray(probs)))

    def better(self, a: float, b: float) -> bool:
        """True when score `a` is strictly better than `b` under this metric."""
        return a > b if self.higher_is_better else a < b


# ------------------------------------------------------------------------------------------- A/B decisions
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


LOG_LOSS = Metric("log_loss", log_loss, higher_is_better=False)
ACCURACY = Metric("accuracy", ab_accuracy, higher_is_better=True)
AB_LOG_LOSS = Metric("ab_log_loss", ab_log_loss, higher_is_better=False)


# ---------------------------------------------------------------------------------------------- the dialect
class Dialect(ABC):
    """One competition's files, labels, metric and submission. Subclasses set the class attributes and
    implement `parse_labels`, `write` and `validate`; `register_dialect` makes them known by name."""

    name: str
    description: str
    slugs: tuple[str, ...]  # Kaggle competition slugs that use this format
    train_file: str
    test_file: str
    label_columns: tuple[str, ...]  # label column(s) of the train file
    classes: tuple[str, ...]  # frame `label` value -> class name (a subset of A, B, tie)
    text_layout: str  # "json_lists": each cell a JSON list of turns; "plain": one string per side
    optional_columns: tuple[str, ...]  # kept in the frame when present (train)
    metric: Metric
    secondary_metrics: tuple[Metric, ...] = ()
    submission_columns: tuple[str, ...]

    def data_config(self, **fields: Any) -> DataConfig:
        """The `DataConfig` that reads this dialect's files (`format` is the dialect's name)."""
        return DataConfig(format=self.name, **fields)  # type: ignore[arg-type]

    @abstractmethod
    def parse_labels(self, raw: pl.DataFrame, ids: list[Any], path: Path) -> list[int]:
        """Label columns of the raw table -> class indices (0 = A, 1 = B, 2 = tie); DataError when bad."""

    @abstractmethod
    def write(
        self,
        ids: Sequence | pl.Series,
        probs: np.ndarray,
        path: str | Path,
        expected_ids: Iterable | pl.Series | None = None,
        fallback_prior: np.ndarray | None = None,
    ) -> Any:
        """Write the submission atomically from (n, 3) probabilities; returns a `SubmissionReport`."""

    @abstractmethod
    def validate(self, path: str | Path, test_path: str | Path) -> Any:
        """Raise SubmissionError (file, rows, field) for anything Kaggle would reject; `SubmissionReport`."""

    def scores(self, labels: np.ndarray, probs: np.ndarray) -> dict[str, float]:
        """The metric and the secondary metrics, by name."""
        return {metric.name: metric(labels, probs) for metric in (self.metric, *self.secondary_metrics)}

    def generate_sample(
        self, out_dir: str | Path, n_train: int, n_test: int, seed: int = 0, traps: bool = True
    ) -> Any:
        """Generated competition files in this dialect's layout (`sample.SampleFiles`)."""
        raise UsageError(f"dialect {self.name!r} has no generated sample data")

    def describe(self) -> dict[str, Any]:
        """What a manifest or report records about the dialect."""
        return {
            "name": self.name,
            "metric": self.metric.name,
            "higher_is_better": self.metric.higher_is_better,
            "secondary_metrics": [metric.name for metric in self.secondary_metrics],
            "classes": list(self.classes),
            "submission_columns": list(self.submission_columns),
        }


class LmsysDialect(Dialect):
    """LMSYS Chatbot Arena / llm-classification-finetuning: JSON-list CSV, one-hot winners, 3-class log loss,
    a probability per class in the submission."""

    name = "lmsys"
    description = "LMSYS / llm-classification-finetuning: JSON-list CSV, A/B/tie, log loss"
    slugs = ("llm-classification-finetuning", "lmsys-chatbot-arena")
    train_file = "train.csv"
    test_file = "test.csv"
    label_columns = LABEL_COLUMNS
    classes = ("model_a", "model_b", "tie")
    text_layout = "json_lists"
    optional_columns = ("model_a", "model_b")
    metric = LOG_LOSS
    secondary_metrics = ()
    submission_columns = ("id", *LABEL_COLUMNS)

    def parse_labels(self, raw: pl.DataFrame, ids: list[Any], path: Path) -> list[int]:
        return parse_one_hot_labels(raw, ids, path, self.label_columns)

    def write(self, ids, probs, path, expected_ids=None, fallback_prior=None):
        return write_submission(ids, probs, path, expected_ids=expected_ids, fallback_prior=fallback_prior)

    def validate(self, path, test_path):
        return validate_submission(path, test_path)

    def generate_sample(self, out_dir, n_train, n_test, seed=0, traps=True):
        return generate_competition_files(out_dir, n_train=n_train, n_test=n_test, seed=seed, traps=traps)


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


# ---------------------------------------------------------------------------------------------- registry
_REGISTRY: dict[str, Dialect] = {}


def register_dialect(dialect: Dialect) -> Dialect:
    """Make `dialect` known by its name (`DataConfig.format`, `--format`/`--dialect`, the manifest)."""
    if not getattr(dialect, "name", ""):
        raise ValueError("a dialect needs a name")
    _REGISTRY[dialect.name] = dialect
    return dialect


def dialect_names() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_dialect(name: str | Dialect) -> Dialect:
    """The registered dialect called `name` (or whose competition slug it is); UsageError listing the known
    ones otherwise."""
    if isinstance(name, Dialect):
        return name
    if name in _REGISTRY:
        return _REGISTRY[name]
    for dialect in _REGISTRY.values():
        if name in dialect.slugs:
            return dialect
    raise UsageError(f"unknown competition dialect {name!r} (known: {', '.join(_REGISTRY)})")


def dialect_of_manifest(manifest: dict | None) -> Dialect:
    """The dialect an artifact was trained for: its manifest's `dialect`, else LMSYS (artifacts written before
    the field existed were all LMSYS). An unknown name is a UsageError (a newer package wrote it)."""
    name = (manifest or {}).get("dialect", DEFAULT_DIALECT)
    if not isinstance(name, str):
        raise UsageError(f"manifest field 'dialect' must be a string, got {name!r}")
    return get_dialect(name)


register_dialect(LmsysDialect())
register_dialect(WsdmDialect())
