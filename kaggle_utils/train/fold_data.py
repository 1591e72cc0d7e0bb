"""One fold's data, built in one step before training: `build_fold_data` returns a `FoldData`.

It splits the frame by the folds file, carves the inner holdout (`train.selection="inner"`), joins teacher
soft targets and pseudo-labels to the training part, and encodes every row set; `train_fold` only consumes it.

    data = build_fold_data(cfg, frame, folds, fold=0, tokenizer=tokenizer)
    data.examples.input_ids, data.monitor_ids, data.val.input_ids, data.soft_targets
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import polars as pl

from kaggle_utils.core.config import PipelineConfig, TrainConfig
from kaggle_utils.core.errors import DataError, UsageError
from kaggle_utils.core.metrics import class_prior, prior_log_loss
from kaggle_utils.data.folds import check_folds
from kaggle_utils.text.encode import EncodedRows, encode_both_orders, encode_rows
from kaggle_utils.text.swap import swap_probs
from kaggle_utils.train.losses import SOFT_LABELS
from kaggle_utils.train.pseudo_labels import join_pseudo, pseudo_for_fold
from kaggle_utils.train.teacher import HeldOutFold, teacher_targets

logger = logging.getLogger(__name__)


@dataclass
class FoldExamples:
    """Encoded training examples: token ids, labels and per-class target vectors, one entry per example."""

    input_ids: list[list[int]]
    labels: np.ndarray
    n_rows: int  # training rows; with swap augmentation example i + n_rows is row i swapped
    targets: dict[str, np.ndarray] = field(default_factory=dict)  # per-class vectors (examples, classes)

    @property
    def lengths(self) -> np.ndarray:
        return np.fromiter((len(ids) for ids in self.input_ids), dtype=np.int64, count=len(self.input_ids))


@dataclass
class FoldData:
    """One fold's rows, encoded: what trains, what is evaluated during training, and the reported fold."""

    examples: FoldExamples  # the training rows (with their swapped copies and target vectors)
    train_ids: list  # ids of the training rows, pseudo rows included
    n_train_rows: int
    val: EncodedRows  # the reported (held-out) fold, scored once after training
    val_labels: np.ndarray
    monitor_ids: list[list[int]]  # rows evaluated during training: the inner holdout or a held-out sample
    monitor_labels: np.ndarray
    eval_set: str  # what `monitor_ids` are, in words
    prior: float  # log loss of the training rows' class prior on the reported fold
    soft_targets: dict = field(default_factory=dict)  # teacher report and pseudo-label counts


def build_fold_data(
    cfg: PipelineConfig,
    train_frame: pl.DataFrame,
    folds: pl.DataFrame,
    fold: int,
    tokenizer,
    target_columns: Sequence[str] = (),
) -> FoldData:
    """Fold `fold`'s training examples, the rows evaluated during training and the reported fold, encoded.

    `target_columns`: training-frame columns of per-class vectors carried into every batch (with a teacher
    or pseudo-labels, `losses.SOFT_LABELS`: `losses.select_loss` names them)."""
    tc = cfg.train
    train_part, val_part = split_fold(train_frame, folds, fold)
    held_out = [val_part]
    val = encode_rows(val_part, tokenizer, cfg.format)
    val_labels = np.asarray(val.labels, dtype=np.int64)
    if tc.selection == "inner":
        # Weights are chosen on rows of the training part, never on the fold whose score is reported.
        train_part, inner_part = split_inner(train_part, folds, tc)
        held_out.append(inner_part)
        monitor = encode_rows(inner_part, tokenizer, cfg.format)
        monitor_ids, monitor_labels = monitor.input_ids, np.asarray(monitor.labels, dtype=np.int64)
        eval_set = f"inner holdout ({inner_part.height} training rows)"
    else:
        # Learning curve only: a fixed sample of the held-out fold, never used to choose weights.
        picked = monitor_sample(len(val.input_ids), tc.eval_rows_cap, tc.seed)
        monitor_ids, monitor_labels = [val.input_ids[i] for i in picked], val_labels[picked]
        eval_set = f"held-out fold sample ({len(picked)} rows, learning curve only)"
    prior = prior_log_loss(
        val_labels, class_prior(np.asarray(train_part["label"].to_numpy(), dtype=np.int64))
    )
    train_part, soft_info = _soft_targets(tc, train_part, held_out, HeldOutFold.from_folds(folds, fold))
    return FoldData(
        examples=training_examples(train_part, tokenizer, cfg, target_columns),
        train_ids=train_part["id"].to_list(),
        n_train_rows=train_part.height,
        val=val,
        val_labels=val_labels,
        monitor_ids=monitor_ids,
        monitor_labels=monitor_labels,
        eval_set=eval_set,
        prior=prior,
        soft_targets=soft_info,
    )


def split_fold(frame: pl.DataFrame, folds: pl.DataFrame, fold: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(training rows, held-out rows) of `frame` for `fold`; every frame row must have a label and a fold."""
    check_folds(folds, frame)
    available = sorted(folds["fold"].unique().to_list())
    if fold not in available:
        raise UsageError(f"fold {fold} is not in the folds file (it has folds {available})")
    if "label" not in frame.columns:
        raise DataError("training frame has no 'label' column (a test file?)")
    unlabelled = frame.filter(pl.col("label").is_null())["id"]
    if len(unlabelled):
        raise DataError(
            f"training frame: {len(unlabelled)} rows have no label (ids {unlabelled.head(5).to_list()})"
        )
    joined = frame.join(folds.select("id", "fold"), on="id", how="left", maintain_order="left")
    val = joined.filter(pl.col("fold") == fold).drop("fold")
    train = joined.filter(pl.col("fold") != fold).drop("fold")
    if val.is_empty() or train.is_empty():
        raise DataError(
            f"fold {fold} leaves {train.height} training and {val.height} held-out rows of the frame"
        )
    return train, val


def split_inner(
    train_part: pl.DataFrame, folds: pl.DataFrame, cfg: TrainConfig
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(rows to train on, inner holdout) of a fold's training part for `selection="inner"`.

    Whole prompt groups (the folds file's `group`) are held out, drawn in a seeded order until the holdout has
    `inner_holdout_fraction` of the rows, at most `eval_rows_cap`: a near-duplicate prompt never sits on both
    sides, as with the folds. The reported held-out fold is not touched.
    """
    if not 0 < cfg.inner_holdout_fraction < 1:
        raise UsageError(f"train.inner_holdout_fraction must be in (0, 1), got {cfg.inner_holdout_fraction}")
    target = min(math.ceil(cfg.inner_holdout_fraction * train_part.height), cfg.eval_rows_cap)
    if target < 1:
        raise UsageError("train.selection='inner' needs train.eval_rows_cap >= 1 (the inner holdout's size)")
    groups = train_part.select("id").join(
        folds.select("id", "group"), on="id", how="left", maintain_order="left"
    )
    sizes = groups.group_by("group").len().sort("group")
    order = np.random.default_rng([cfg.seed, 0x1E]).permutation(sizes.height)
    counts = sizes["len"].to_numpy()[order]
    chosen, total = [], 0
    for index, count in zip(order, counts, strict=True):
        if total >= target:
            break
        if total + count > target and total > 0:
            continue  # a big group would overshoot the cap; smaller ones may still fit
        chosen.append(sizes["group"][int(index)])
        total += int(count)
    held = set(groups.filter(pl.col("group").is_in(chosen))["id"].to_list())
    mask = train_part["id"].is_in(list(held))
    inner, rest = train_part.filter(mask), train_part.filter(~mask)
    if inner.is_empty() or rest.is_empty():
        raise DataError(f"the inner holdout leaves {rest.height} training and {inner.height} inner rows")
    return rest, inner


def monitor_sample(n_rows: int, cap: int, seed: int) -> np.ndarray:
    """Sorted row positions of a fixed, seeded sample of at most `cap` rows (all rows when n_rows <= cap)."""
    if n_rows <= cap:
        return np.arange(n_rows)
    return np.sort(np.random.default_rng([seed, 0xE7]).choice(n_rows, size=cap, replace=False))


def _soft_targets(
    tc: TrainConfig, train_part: pl.DataFrame, held_out: list[pl.DataFrame], fold: HeldOutFold
) -> tuple[pl.DataFrame, dict]:
    """The training part with a `SOFT_LABELS` column when the config distils: the teacher's probabilities
    (teacher.py: checked, repairs counted, refused when the teacher saw `fold`, the scored fold) or, with
    pseudo-labels and no teacher, the one-hot labels; then `fold`'s pseudo rows
    (pseudo_labels.pseudo_for_fold: from a teacher that left `fold` out) that share no prompt group with
    `held_out` (join_pseudo, drops counted)."""
    if tc.teacher_path is None and tc.pseudo_path is None:
        return train_part, {}
    info: dict = {}
    if tc.teacher_path is not None:
        probs, report = teacher_targets(
            train_part, tc.teacher_path, tc.teacher_name, held_out=fold, allow_leak=tc.teacher_allow_leak
        )
        info["teacher"] = report.to_dict()
    else:
        probs = np.eye(3)[train_part["label"].to_numpy().astype(np.int64)]
        info["teacher"] = None
    train_part = train_part.with_columns(pl.Series(SOFT_LABELS, probs.tolist(), dtype=pl.List(pl.Float64)))
    if tc.pseudo_path is not None:
        pseudo, fold_check = pseudo_for_fold(tc.pseudo_path, fold, tc.teacher_allow_leak)
        train_part, counts = join_pseudo(train_part, held_out, pseudo)
        info["pseudo"] = {"path": tc.pseudo_path, **counts, "fold_check": fold_check}
    return train_part, info


def training_examples(
    frame: pl.DataFrame, tokenizer, cfg: PipelineConfig, target_columns: Sequence[str] = ()
) -> FoldExamples:
    """Encoded training rows; with swap augmentation ("double" or "random") followed by their A/B-swapped
    copies (labels swapped, and the A/B entries of each target column), so example i + n is row i swapped.
    Which of them an epoch uses: `epoch_examples`."""

    targets = {name: _target_column(frame, name) for name in target_columns}
    mode = swap_mode(cfg.train)
    if mode != "none":
        original, swapped = encode_both_orders(frame, tokenizer, cfg.format)
        logger.info("train encoding: %s", original.summary())
        return FoldExamples(
            original.input_ids + swapped.input_ids,
            np.concatenate([original.labels, swapped.labels]),
            frame.height,
            {name: np.concatenate([v, swap_probs(v)]) for name, v in targets.items()},
        )
    original = encode_rows(frame, tokenizer, cfg.format)
    logger.info("train encoding: %s", original.summary())
    return FoldExamples(original.input_ids, original.labels, frame.height, targets)


def _target_column(frame: pl.DataFrame, name: str) -> np.ndarray:
    """A training-frame column of per-class vectors (A, B[, tie]) as float (rows, classes); refuses gaps."""
    if name not in frame.columns:
        raise DataError(f"training frame has no target column {name!r} (columns: {frame.columns})")
    values = frame[name].to_list()
    widths = {len(v) if isinstance(v, (list, tuple, np.ndarray)) else -1 for v in values}
    if len(widths) != 1 or widths.pop() not in (2, 3):
        bad = next(
            i
            for i, v in enumerate(values)
            if not isinstance(v, (list, tuple, np.ndarray))
            or len(v) != len(values[0])
            or len(v) not in (2, 3)
        )
        raise DataError(
            f"training frame column {name!r}, row {bad} (id {frame['id'][bad]}): expected a vector of "
            f"2 or 3 class values like every row, got {values[bad]!r}"
        )
    array = np.asarray(values, dtype=np.float64)
    if not np.isfinite(array).all():
        bad = int(np.flatnonzero(~np.isfinite(array).all(axis=1))[0])
        raise DataError(
            f"training frame column {name!r}, row {bad} (id {frame['id'][bad]}): non-finite value "
            f"{values[bad]!r}"
        )
    return array


def swap_mode(cfg: TrainConfig) -> str:
    if cfg.swap_augment not in ("none", "double", "random"):
        raise UsageError(f"train.swap_augment must be 'none', 'double' or 'random', got {cfg.swap_augment!r}")
    return cfg.swap_augment
