"""Length and formatting features -> scikit-learn, trained with the grouped folds.

Every competitor's sanity check: response length alone reaches about 1.065 on the real data (class prior
1.0972), because people prefer longer, better formatted, non-refusing answers. The fitted model (the fold
models averaged) is also the cheap fallback predictor for inference's time guard, so it saves and loads as
one file and predicts from a parsed frame alone.

The saved form is plain JSON (the fitted parameters: tree nodes, or scaler + coefficients) plus a sidecar
manifest holding its sha256, never a pickle: a found baseline file is data, loading it cannot run code, and
one whose bytes are not listed in its manifest is refused. Loading rebuilds numpy predictors that compute
exactly what the fitted scikit-learn estimators compute (same node tests, same summation order, scikit-learn's
softmax / expit), so a saved model predicts the same probabilities as the one in memory.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import FunctionTransformer, StandardScaler
from sklearn.utils.extmath import softmax
from threadpoolctl import threadpool_limits

from kaggle_utils.core.config import BaselineConfig
from kaggle_utils.core.console import progress_bar
from kaggle_utils.core.errors import ArtifactError, DataError
from kaggle_utils.core.fileio import atomic_write_bytes
from kaggle_utils.core.metrics import OofScore, class_prior, make_oof, score_oof
from kaggle_utils.data.folds import check_folds
from kaggle_utils.text.formatting import average_views, swap_frame, swap_labels

# Bump when the features change: a saved model refuses to predict from features it was not trained on.
FEATURE_VERSION = "baseline-features-v1"
N_CLASSES = 3
# The saved form: JSON parameters + `<file>.manifest.json` (bytes, sha256). Bump the version when it changes.
SAVE_FORMAT = "kaggle_utils-baseline-params"
SAVE_FORMAT_VERSION = 1
MANIFEST_SUFFIX = ".manifest.json"
# Suffixes and leading bytes of pickle-based files (joblib, pickle): refused unread, unpickling runs code.
_PICKLE_SUFFIXES = (".joblib", ".pkl", ".pickle")
_PICKLE_MAGIC = b"\x80"

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
            "estimators": [_export_estimator(estimator) for estimator in self.estimators],
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
        """Rebuild a saved model from its JSON parameters; refuses pickles, unlisted files and hash mismatches."""
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
            estimators = [_import_estimator(spec, len(feature_names())) for spec in payload["estimators"]]
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


class TreeEnsemblePredictor:
    """A fitted HistGradientBoostingClassifier rebuilt from its tree nodes (numerical splits only).

    Same arithmetic as scikit-learn's: raw score = baseline + the trees' leaf values added iteration by
    iteration, then softmax (multiclass) or expit (binary)."""

    def __init__(
        self,
        classes: np.ndarray,
        baseline: np.ndarray,
        trees: list[list[dict[str, np.ndarray]]],
        n_features: int,
    ) -> None:
        self.classes_ = classes
        self.baseline = baseline
        self.trees = trees
        self.n_features = n_features

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        features = np.asarray(features, dtype=np.float64)
        if features.ndim != 2 or features.shape[1] != self.n_features:
            raise ValueError(f"expected {self.n_features} features, got shape {features.shape}")
        raw = np.zeros((features.shape[0], self.baseline.shape[1]), dtype=np.float64, order="F")
        raw += self.baseline
        for iteration in self.trees:
            for k, tree in enumerate(iteration):
                raw[:, k] += _tree_values(tree, features)
        return _raw_to_proba(raw)


class LinearPredictor:
    """The logreg pipeline (signed log1p -> standard scaler -> logistic regression) from its parameters."""

    def __init__(
        self,
        classes: np.ndarray,
        mean: np.ndarray,
        scale: np.ndarray,
        coef: np.ndarray,
        intercept: np.ndarray,
    ) -> None:
        self.classes_, self.mean, self.scale, self.coef, self.intercept = (
            classes,
            mean,
            scale,
            coef,
            intercept,
        )

    def predict_proba(self, features: np.ndarray) -> np.ndarray:
        values = _signed_log1p(np.asarray(features, dtype=np.float64))
        values -= self.mean
        values /= self.scale
        decision = values @ self.coef.T + self.intercept
        if decision.shape[1] == 1:
            from scipy.special import expit

            positive = expit(decision[:, 0])
            return np.column_stack([1 - positive, positive])
        return softmax(decision, copy=False)


def _raw_to_proba(raw: np.ndarray) -> np.ndarray:
    if raw.shape[1] == 1:  # binary: HalfBinomialLoss
        from scipy.special import expit

        proba = np.empty((raw.shape[0], 2), dtype=raw.dtype)
        proba[:, 1] = expit(raw[:, 0])
        proba[:, 0] = 1 - proba[:, 1]
        return proba
    return softmax(raw)


def _tree_values(tree: dict[str, np.ndarray], features: np.ndarray) -> np.ndarray:
    """Leaf value per row: NaN follows `missing_go_to_left`, else `x <= num_threshold` goes left."""
    node = np.zeros(features.shape[0], dtype=np.int64)
    active = np.flatnonzero(~tree["is_leaf"][node])
    while active.size:
        current = node[active]
        values = features[active, tree["feature_idx"][current]]
        go_left = np.where(
            np.isnan(values), tree["missing_go_to_left"][current], values <= tree["num_threshold"][current]
        )
        node[active] = np.where(go_left, tree["left"][current], tree["right"][current])
        active = active[~tree["is_leaf"][node[active]]]
    return tree["value"][node]


_TREE_FIELDS = ("value", "feature_idx", "num_threshold", "missing_go_to_left", "left", "right", "is_leaf")


def _export_estimator(estimator) -> dict:
    """JSON-ready parameters of a fitted estimator (or of a predictor rebuilt by `_import_estimator`)."""
    if isinstance(estimator, TreeEnsemblePredictor):
        trees = [
            [{name: tree[name].tolist() for name in _TREE_FIELDS} for tree in it] for it in estimator.trees
        ]
        return {
            "kind": "hgb",
            "classes": estimator.classes_.tolist(),
            "baseline": estimator.baseline.tolist(),
            "n_features": estimator.n_features,
            "trees": trees,
        }
    if isinstance(estimator, LinearPredictor):
        return {
            "kind": "logreg",
            "classes": estimator.classes_.tolist(),
            "mean": estimator.mean.tolist(),
            "scale": estimator.scale.tolist(),
            "coef": estimator.coef.tolist(),
            "intercept": estimator.intercept.tolist(),
        }
    if isinstance(estimator, HistGradientBoostingClassifier):
        trees = []
        for iteration in estimator._predictors:
            per_class = []
            for predictor in iteration:
                nodes = predictor.nodes
                if nodes["is_categorical"].any():
                    raise ArtifactError("baseline save: categorical tree splits are not supported")
                per_class.append({name: nodes[name].tolist() for name in _TREE_FIELDS})
            trees.append(per_class)
        return {
            "kind": "hgb",
            "classes": estimator.classes_.tolist(),
            "baseline": np.asarray(estimator._baseline_prediction, dtype=np.float64).tolist(),
            "n_features": int(estimator.n_features_in_),
            "trees": trees,
        }
    steps = getattr(estimator, "named_steps", None)
    if steps is not None and {"standardscaler", "logisticregression"} <= set(steps):
        scaler, logreg = steps["standardscaler"], steps["logisticregression"]
        return {
            "kind": "logreg",
            "classes": logreg.classes_.tolist(),
            "mean": scaler.mean_.tolist(),
            "scale": scaler.scale_.tolist(),
            "coef": logreg.coef_.tolist(),
            "intercept": logreg.intercept_.tolist(),
        }
    raise ArtifactError(f"baseline save: cannot export a {type(estimator).__name__}")


def _import_estimator(spec: dict, n_features: int) -> TreeEnsemblePredictor | LinearPredictor:
    """Rebuild a predictor from `_export_estimator`'s parameters, checking shapes and node indices."""
    classes = np.asarray(spec["classes"], dtype=np.int64)
    if spec["kind"] == "hgb":
        baseline = np.asarray(spec["baseline"], dtype=np.float64)
        if int(spec["n_features"]) != n_features or baseline.ndim != 2 or baseline.shape[0] != 1:
            raise ValueError("hgb: feature count or baseline shape does not match")
        trees = []
        for iteration in spec["trees"]:
            if len(iteration) != baseline.shape[1]:
                raise ValueError("hgb: trees per iteration differ from the baseline's width")
            trees.append([_import_tree(tree, n_features) for tree in iteration])
        return TreeEnsemblePredictor(classes, baseline, trees, n_features)
    if spec["kind"] == "logreg":
        mean, scale = np.asarray(spec["mean"], np.float64), np.asarray(spec["scale"], np.float64)
        coef, intercept = np.asarray(spec["coef"], np.float64), np.asarray(spec["intercept"], np.float64)
        if (
            mean.shape != (n_features,)
            or scale.shape != (n_features,)
            or coef.ndim != 2
            or coef.shape[1] != n_features
            or intercept.shape != (coef.shape[0],)
        ):
            raise ValueError("logreg: parameter shapes do not match the features")
        return LinearPredictor(classes, mean, scale, coef, intercept)
    raise ValueError(f"unknown estimator kind {spec['kind']!r}")


def _import_tree(tree: dict, n_features: int) -> dict[str, np.ndarray]:
    dtypes = {
        "value": np.float64,
        "feature_idx": np.int64,
        "num_threshold": np.float64,
        "missing_go_to_left": bool,
        "left": np.int64,
        "right": np.int64,
        "is_leaf": bool,
    }
    arrays = {name: np.asarray(tree[name], dtype=dtypes[name]) for name in _TREE_FIELDS}
    size = len(arrays["value"])
    inner = ~arrays["is_leaf"]
    if size == 0 or any(len(array) != size for array in arrays.values()):
        raise ValueError("tree: node arrays of different lengths")
    for name, upper in (("feature_idx", n_features), ("left", size), ("right", size)):
        values = arrays[name][inner]
        if values.size and (values.min() < 0 or values.max() >= upper):
            raise ValueError(f"tree: {name} out of range")
    # children come after their parent (the grower's order), so traversal always ends at a leaf
    index = np.arange(size)[inner]
    if np.any(arrays["left"][inner] <= index) or np.any(arrays["right"][inner] <= index):
        raise ValueError("tree: a child index does not follow its parent")
    if not all(math.isfinite(float(v)) for v in arrays["value"]):
        raise ValueError("tree: non-finite leaf values")
    return arrays


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
