"""What a competition dialect is: the `Dialect` base class a new competition subclasses, and its `Metric`.

Every competition of this family shares the pipeline: a 3-class classifier (A, B, tie) whose probabilities
are always (n, 3) in that order. A dialect owns only the edges: file layout, labels, metric, submission.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.core.config import DataConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.metrics import log_loss


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


LOG_LOSS = Metric("log_loss", log_loss, higher_is_better=False)


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
