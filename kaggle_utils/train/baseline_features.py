"""The feature baseline's inputs: lengths, turns, markdown, refusals and flags per side, and A-B contrasts.

Usage: `features = baseline_features(frame)` (Float64 columns in `feature_names()` order).
"""

from __future__ import annotations

import polars as pl

from kaggle_utils.core.errors import DataError

# Bump when the features change: a saved model refuses to predict from features it was not trained on.
FEATURE_VERSION = "baseline-features-v1"
_BULLET = r"(?m)^[ \t]*(?:[-*+•]|\d{1,3}[.)])[ \t]+"
_HEADER = r"(?m)^[ \t]*#{1,6}[ \t]"
_BOLD = r"\*\*[^*\n]+\*\*"
_REFUSAL = (
    r"(?i)\b(?:i['’]?m sorry|i am sorry|i apologi[sz]e|i can(?:not|['’]?t)|i['’]?m (?:not able|unable)|"
    r"i am (?:not able|unable)|as an ai|as a language model|i['’]?m just an ai|i won['’]?t be able)"
)
_SIDE_FEATURES = (
    "chars_total", "chars_last", "words_last", "lines_last", "bullets_last", "headers_last",
    "code_blocks_last", "bold_last", "questions_last", "refusal_last", "empty_last", "empty_total",
)  # fmt: skip
_LENGTH_FEATURES = ("chars_total", "chars_last", "words_last", "lines_last")


def _turns_text(column: str) -> pl.Expr:
    return pl.col(column).list.eval(pl.element().fill_null("")).list.join("\n").fill_null("")


def _side_expressions(column: str, side: str) -> list[pl.Expr]:
    total = _turns_text(column)
    last = pl.col(column).list.last().fill_null("")
    values = {
        "chars_total": total.str.len_chars(),
        "chars_last": last.str.len_chars(),
        "words_last": last.str.count_matches(r"\S+"),
        "lines_last": last.str.count_matches("\n"),
        "bullets_last": last.str.count_matches(_BULLET),
        "headers_last": last.str.count_matches(_HEADER),
        "code_blocks_last": last.str.count_matches("```") // 2,
        "bold_last": last.str.count_matches(_BOLD),
        "questions_last": last.str.count_matches(r"\?"),
        "refusal_last": last.str.contains(_REFUSAL),
        "empty_last": last.str.strip_chars().str.len_chars() == 0,
        "empty_total": total.str.strip_chars().str.len_chars() == 0,
    }
    return [values[name].cast(pl.Float64).alias(f"{side}_{name}") for name in _SIDE_FEATURES]


def feature_names() -> list[str]:
    """Column order of `baseline_features`."""
    names = ["prompt_chars_total", "prompt_chars_last", "prompt_turns", "identical_responses"]
    names += [f"{side}_{name}" for side in ("a", "b") for name in _SIDE_FEATURES]
    names += [f"diff_{name}" for name in _SIDE_FEATURES]
    names += [f"logratio_{name}" for name in _LENGTH_FEATURES]
    names += [f"share_a_{name}" for name in _LENGTH_FEATURES]
    return names


def baseline_features(frame: pl.DataFrame) -> pl.DataFrame:
    """Numeric features (Float64, no nulls) of a parsed frame: lengths, turns, formatting, refusals, flags."""
    missing = [c for c in ("prompt", "response_a", "response_b") if c not in frame.columns]
    if missing:
        raise DataError(f"baseline features: frame lacks columns {missing}")
    base = frame.select(
        _turns_text("prompt").str.len_chars().cast(pl.Float64).alias("prompt_chars_total"),
        pl.col("prompt")
        .list.last()
        .fill_null("")
        .str.len_chars()
        .cast(pl.Float64)
        .alias("prompt_chars_last"),
        pl.col("prompt").list.len().fill_null(0).cast(pl.Float64).alias("prompt_turns"),
        (_turns_text("response_a") == _turns_text("response_b"))
        .cast(pl.Float64)
        .alias("identical_responses"),
        *_side_expressions("response_a", "a"),
        *_side_expressions("response_b", "b"),
    )
    derived = base.with_columns(
        *[(pl.col(f"a_{name}") - pl.col(f"b_{name}")).alias(f"diff_{name}") for name in _SIDE_FEATURES],
        *[
            (pl.col(f"a_{name}").log1p() - pl.col(f"b_{name}").log1p()).alias(f"logratio_{name}")
            for name in _LENGTH_FEATURES
        ],
        *[
            ((pl.col(f"a_{name}") + 1) / (pl.col(f"a_{name}") + pl.col(f"b_{name}") + 2)).alias(
                f"share_a_{name}"
            )
            for name in _LENGTH_FEATURES
        ],
    )
    return derived.select(feature_names())
