"""Length and formatting features -> scikit-learn, trained with the grouped folds.

Every competitor's sanity check: response length alone reaches about 1.065 on the real data (class prior
1.0972), because people prefer longer, better formatted, non-refusing answers. The fitted model (the fold
models averaged) is also the cheap fallback predictor for inference's time guard, so it saves and loads as
one file and predicts from a parsed frame alone.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from pathlib import Path

import joblib
import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from kaggle_utils.config import BaselineConfig
from kaggle_utils.errors import ArtifactError, DataError
from kaggle_utils.fileio import atomic_write_bytes
from kaggle_utils.folds import check_folds
from kaggle_utils.formatting import swap_frame, swap_labels, swap_probs
from kaggle_utils.metrics import OofScore, class_prior, make_oof, score_oof

# Bump when the features change: a saved model refuses to predict from features it was not trained on.
FEATURE_VERSION = "baseline-features-v1"
N_CLASSES = 3

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


def _new_estimator(cfg: BaselineConfig):
    if cfg.model == "hgb":
        return HistGradientBoostingClassifier(
            max_iter=cfg.max_iter,
            learning_rate=cfg.learning_rate,
            max_leaf_nodes=cfg.max_leaf_nodes,
            min_samples_leaf=cfg.min_samples_leaf,
            l2_regularization=cfg.l2_regularization,
            early_stopping=False,
            random_state=cfg.seed,
        )
    if cfg.model == "logreg":
        # Counts and lengths are heavy-tailed: a signed log keeps a few 20k-character answers from dominating.
        return make_pipeline(
            FunctionTransformer(_signed_log1p), StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)
        )
    raise ValueError(f"unknown baseline model {cfg.model!r} (expected 'hgb' or 'logreg')")


def _signed_log1p(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values))


def _full_proba(estimator, features: np.ndarray) -> np.ndarray:
    """(n, 3) probabilities even when a fold's training data lacked a class (tiny data)."""
    probs = np.zeros((features.shape[0], N_CLASSES))
    probs[:, estimator.classes_.astype(int)] = estimator.predict_proba(features)
    return probs


@dataclass
class BaselineModel:
    """The fold models of one CV run; predicts the mean of their probabilities (and of both A/B orders)."""

    estimators: list
    config: BaselineConfig
    class_prior: np.ndarray
    feature_names: list[str] = field(default_factory=feature_names)
    feature_version: str = FEATURE_VERSION

    def predict_proba(self, frame: pl.DataFrame) -> np.ndarray:
        """(n, 3) float64 probabilities (A, B, tie) for a parsed frame, rows summing to one."""
        features = baseline_features(frame).to_numpy()
        with threadpool_limits(limits=self.config.n_threads):
            probs = np.mean([_full_proba(estimator, features) for estimator in self.estimators], axis=0)
            if self.config.swap_augmentation:
                swapped = baseline_features(swap_frame(frame)).to_numpy()
                probs_swapped = np.mean(
                    [_full_proba(estimator, swapped) for estimator in self.estimators], axis=0
                )
                probs = (probs + swap_probs(probs_swapped)) / 2
        return probs / probs.sum(axis=1, keepdims=True)

    def save(self, path: str | Path) -> Path:
        """One joblib file, written atomically. Load only files you produced: joblib runs pickle."""
        buffer = io.BytesIO()
        joblib.dump(self, buffer)
        return atomic_write_bytes(path, buffer.getvalue())

    @classmethod
    def load(cls, path: str | Path) -> BaselineModel:
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"baseline model file not found: {path}")
        model = joblib.load(path)
        if not isinstance(model, cls):
            raise ArtifactError(f"{path}: not a BaselineModel (found {type(model).__name__})")
        if model.feature_version != FEATURE_VERSION or model.feature_names != feature_names():
            raise ArtifactError(
                f"{path}: trained on features {model.feature_version!r}, this code computes {FEATURE_VERSION!r}"
            )
        return model


@dataclass
class BaselineResult:
    """OOF predictions (metrics.OOF_COLUMNS layout), their scores, and the fitted fold-averaged model."""

    oof: pl.DataFrame
    score: OofScore
    model: BaselineModel

    @property
    def log_loss(self) -> float:
        return self.score.log_loss

    @property
    def per_fold(self) -> dict[int, float]:
        return self.score.per_fold


def run_baseline_cv(
    train: pl.DataFrame, folds: pl.DataFrame, cfg: BaselineConfig | None = None, name: str = "baseline"
) -> BaselineResult:
    """Fit one model per fold on the other folds, predict the held-out fold; return OOF, scores, model."""
    cfg = cfg or BaselineConfig()
    if "label" not in train.columns or train["label"].null_count():
        raise DataError("baseline CV needs a training frame with a non-null 'label' column")
    check_folds(folds, train)
    fold_of_row = train.select("id").join(folds.select("id", "fold"), on="id", how="left")["fold"].to_numpy()
    labels = train["label"].to_numpy().astype(np.int64)
    features = baseline_features(train).to_numpy()
    # Only the swapped copy's features are used; its labels are swap_labels(labels) below.
    swapped = baseline_features(swap_frame(train)).to_numpy() if cfg.swap_augmentation else None

    oof_probs = np.zeros((train.height, N_CLASSES))
    estimators = []
    fold_numbers = sorted(int(fold) for fold in np.unique(fold_of_row))
    for fold in tqdm(fold_numbers, desc="baseline CV", unit="fold", leave=False):
        fit_rows, held_out = fold_of_row != fold, fold_of_row == fold
        fit_x, fit_y = features[fit_rows], labels[fit_rows]
        if swapped is not None:
            fit_x = np.vstack([fit_x, swapped[fit_rows]])
            fit_y = np.concatenate([fit_y, swap_labels(labels[fit_rows])])
        with threadpool_limits(limits=cfg.n_threads):
            estimator = _new_estimator(cfg).fit(fit_x, fit_y)
            probs = _full_proba(estimator, features[held_out])
            if swapped is not None:
                probs = (probs + swap_probs(_full_proba(estimator, swapped[held_out]))) / 2
        estimators.append(estimator)
        oof_probs[held_out] = probs / probs.sum(axis=1, keepdims=True)

    oof = make_oof(name, train["id"], fold_of_row, oof_probs, labels)
    model = BaselineModel(estimators=estimators, config=cfg, class_prior=class_prior(labels))
    return BaselineResult(oof=oof, score=score_oof(oof), model=model)
