"""Length and formatting features -> scikit-learn, trained with the grouped folds; the sanity check and the
cheap fallback predictor for inference's time guard.

A fitted model saves as plain JSON parameters plus a `<file>.manifest.json` with its sha256 (never a pickle;
an unlisted file is refused). Usage: `result = run_baseline_cv(train, folds); result.model.save("b.json")`.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from threadpoolctl import threadpool_limits

from kaggle_utils.core.config import BaselineConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import ArtifactError, DataError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.core.metrics import OofScore, class_prior, make_oof, score_oof
from kaggle_utils.data.folds import check_folds
from kaggle_utils.text.swap import average_views, swap_frame, swap_labels
from kaggle_utils.train.baseline_features import FEATURE_VERSION, baseline_features, feature_names
from kaggle_utils.train.baseline_params import export_estimator, import_estimator, signed_log1p

N_CLASSES = 3
# The saved form: JSON parameters + `<file>.manifest.json` (bytes, sha256). Bump the version when it changes.
SAVE_FORMAT = "kaggle_utils-baseline-params"
SAVE_FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
# Suffixes and leading bytes of pickle-based files (joblib, pickle): refused unread, unpickling runs code.
_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
_PICKLE_MAGIC = b"\x80"


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
            FunctionTransformer(signed_log1p), StandardScaler(), LogisticRegression(C=0.1, max_iter=2000)
        )
    raise ValueError(f"unknown baseline model {cfg.model!r} (expected 'hgb' or 'logreg')")


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
                probs = average_views(probs, probs_swapped)
        return probs / probs.sum(axis=1, keepdims=True)

    def save(self, path: str | Path) -> Path:
        """The fitted parameters as JSON at `path` (atomically) and `<path>.manifest.json` with its sha256.

        JSON, not joblib: a baseline file found on disk is then data that cannot execute when loaded."""
        path = Path(path)
        if path.suffix.lower() in _PICKLE_SUFFIXES:
            raise ArtifactError(
                f"{path}: baselines are saved as JSON parameters, not pickles; use a .json name"
            )
        payload = {
            "format": SAVE_FORMAT,
            "format_version": SAVE_FORMAT_VERSION,
            "feature_version": self.feature_version,
            "feature_names": list(self.feature_names),
            "config": {name: getattr(self.config, name) for name in self.config.__dataclass_fields__},
            "class_prior": [float(value) for value in np.asarray(self.class_prior, dtype=np.float64)],
            "estimators": [export_estimator(estimator) for estimator in self.estimators],
        }
        data = json.dumps(payload, allow_nan=False, separators=(",", ":")).encode("utf-8")
        atomic_write_bytes(path, data)
        manifest = {
            "kind": SAVE_FORMAT,
            "format_version": SAVE_FORMAT_VERSION,
            "created_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "files": {path.name: {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}},
        }
        atomic_write_bytes(baseline_manifest_path(path), json.dumps(manifest, indent=2).encode("utf-8"))
        return path

    @classmethod
    def load(cls, path: str | Path) -> BaselineModel:
        """Rebuild a saved model from its JSON parameters (pickles, unlisted or changed files refused)."""
        path = Path(path)
        if not path.is_file():
            raise ArtifactError(f"baseline model file not found: {path}")
        with open(path, "rb") as handle:
            head = handle.read(1)
        if path.suffix.lower() in _PICKLE_SUFFIXES or head == _PICKLE_MAGIC:
            raise ArtifactError(
                f"{path}: a pickle/joblib baseline is never loaded (unpickling runs code); "
                f"re-save the model with BaselineModel.save(<name>.json)"
            )
        data = path.read_bytes()
        _check_listed(path, data)
        try:
            payload = json.loads(data.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ArtifactError(f"{path}: not a JSON baseline ({error})") from error
        if not isinstance(payload, dict) or payload.get("format") != SAVE_FORMAT:
            raise ArtifactError(f"{path}: not a saved baseline (format {SAVE_FORMAT!r} expected)")
        if payload.get("format_version") != SAVE_FORMAT_VERSION:
            raise ArtifactError(
                f"{path}: baseline format version {payload.get('format_version')!r}, this code "
                f"reads {SAVE_FORMAT_VERSION}"
            )
        if (
            payload.get("feature_version") != FEATURE_VERSION
            or payload.get("feature_names") != feature_names()
        ):
            raise ArtifactError(
                f"{path}: trained on features {payload.get('feature_version')!r}, this code "
                f"computes {FEATURE_VERSION!r}"
            )
        try:
            config = BaselineConfig(**payload["config"])
            estimators = [import_estimator(spec, len(feature_names())) for spec in payload["estimators"]]
            prior = np.asarray(payload["class_prior"], dtype=np.float64)
        except (KeyError, TypeError, ValueError) as error:
            raise ArtifactError(
                f"{path}: malformed baseline parameters ({type(error).__name__}: {error})"
            ) from error
        if not estimators or prior.shape != (N_CLASSES,):
            raise ArtifactError(f"{path}: malformed baseline parameters (no estimators or a bad class prior)")
        return cls(
            estimators=estimators,
            config=config,
            class_prior=prior,
            feature_names=list(payload["feature_names"]),
            feature_version=payload["feature_version"],
        )


def baseline_manifest_path(path: str | Path) -> Path:
    """Where the manifest listing a saved baseline's sha256 lives: beside it, `<name>.manifest.json`."""
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


def _check_listed(path: Path, data: bytes) -> None:
    """Refuse a baseline file its manifest does not list with exactly these bytes."""
    manifest_path = baseline_manifest_path(path)
    if not manifest_path.is_file():
        raise ArtifactError(
            f"{path}: no manifest {manifest_path.name} beside it; an unlisted baseline is not loaded"
        )
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        entry = manifest["files"][path.name]
        want_bytes, want_sha = int(entry["bytes"]), str(entry["sha256"])
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as error:
        raise ArtifactError(
            f"{manifest_path}: does not list {path.name} with bytes and sha256 ({error!r})"
        ) from error
    if len(data) != want_bytes or hashlib.sha256(data).hexdigest() != want_sha:
        raise ArtifactError(f"{path}: does not match the size/sha256 listed in {manifest_path.name}")


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
    for fold in progress_bar(fold_numbers, desc="baseline CV", unit="fold", leave=False):
        fit_rows, held_out = fold_of_row != fold, fold_of_row == fold
        fit_x, fit_y = features[fit_rows], labels[fit_rows]
        if swapped is not None:
            fit_x = np.vstack([fit_x, swapped[fit_rows]])
            fit_y = np.concatenate([fit_y, swap_labels(labels[fit_rows])])
        with threadpool_limits(limits=cfg.n_threads):
            estimator = _new_estimator(cfg).fit(fit_x, fit_y)
            probs = _full_proba(estimator, features[held_out])
            if swapped is not None:
                probs = average_views(probs, _full_proba(estimator, swapped[held_out]))
        estimators.append(estimator)
        oof_probs[held_out] = probs / probs.sum(axis=1, keepdims=True)

    oof = make_oof(name, train["id"], fold_of_row, oof_probs, labels)
    model = BaselineModel(estimators=estimators, config=cfg, class_prior=class_prior(labels))
    return BaselineResult(oof=oof, score=score_oof(oof), model=model)
