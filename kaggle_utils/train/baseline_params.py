"""Fitted baseline estimators <-> plain JSON parameters, rebuilt as numpy predictors (never pickles).

The rebuilt predictors compute exactly what the fitted scikit-learn estimators compute (same node tests,
same summation order, scikit-learn's softmax / expit). Usage: `import_estimator(export_estimator(est), n)`.
"""

from __future__ import annotations

import math

import numpy as np
from sklearn.ensemble import HistGradientBoostingClassifier
from sklearn.utils.extmath import softmax

from kaggle_utils.core.errors import ArtifactError


def signed_log1p(values: np.ndarray) -> np.ndarray:
    return np.sign(values) * np.log1p(np.abs(values))


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
        values = signed_log1p(np.asarray(features, dtype=np.float64))
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


def export_estimator(estimator) -> dict:
    """JSON-ready parameters of a fitted estimator (or of a predictor rebuilt by `import_estimator`)."""
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


def import_estimator(spec: dict, n_features: int) -> TreeEnsemblePredictor | LinearPredictor:
    """Rebuild a predictor from `export_estimator`'s parameters, checking shapes and node indices."""
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
