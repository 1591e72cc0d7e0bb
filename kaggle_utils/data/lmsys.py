"""LMSYS Chatbot Arena / llm-classification-finetuning dialect: JSON-list CSV, A/B/tie, log loss."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.data.dialect_base import LOG_LOSS, Dialect
from kaggle_utils.data.labels import parse_one_hot_labels
from kaggle_utils.data.sample import generate_competition_files
from kaggle_utils.data.submission import validate_submission, write_submission


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
