"""Generated competition files (LMSYS CSV or WSDM parquet) with a learnable preference signal and every trap.

Real data cannot be downloaded here, so the demo, tests and benchmarks run on this; `SampleFiles.traps` says
which ids carry which trap. Usage: `files = generate_competition_files(tmp_dir, n_train=2000, seed=0)`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from kaggle_utils.core.config import LABEL_COLUMNS
from kaggle_utils.data.sample_text import SampleRow, TextMaker, generate_rows
from kaggle_utils.data.sample_traps import WSDM_TRAP_RATES, apply_trap, apply_wsdm_trap, cell_json, plan_traps


@dataclass
class SampleFiles:
    """Paths of the written files; `traps` maps split -> trap kind -> ids that carry it."""

    train_csv: Path
    test_csv: Path
    sample_submission_csv: Path
    traps: dict[str, dict[str, list[int]]] = field(default_factory=dict)

    # The generic names: for a parquet dialect (WSDM) the `*_csv` fields hold the parquet paths.
    @property
    def train_path(self) -> Path:
        return self.train_csv

    @property
    def test_path(self) -> Path:
        return self.test_csv


@dataclass
class SampleData:
    """The generated files in memory, cells exactly as written (JSON text; None is an empty CSV field)."""

    train: pl.DataFrame
    test: pl.DataFrame
    sample_submission: pl.DataFrame
    traps: dict[str, dict[str, list[int]]]


# ------------------------------------------------------------------------------------------------ generation
def generate_competition_frames(
    n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleData:
    """The three competition files as polars frames of raw cells: what `generate_competition_files` writes."""
    rng = np.random.default_rng(seed)
    text = TextMaker(rng)
    all_ids = _make_ids(rng, n_train + n_test)
    test_mask = np.zeros(n_train + n_test, dtype=bool)
    test_mask[rng.choice(n_train + n_test, size=n_test, replace=False)] = True
    train_ids, test_ids = all_ids[~test_mask].tolist(), all_ids[test_mask].tolist()

    trap_ids: dict[str, dict[str, list[int]]] = {}
    frames = {}
    for split, ids in (("train", train_ids), ("test", test_ids)):
        plan = plan_traps(rng, len(ids)) if traps else {}
        long_rows = set(plan.get("very_long_field", []))
        rows = generate_rows(rng, text, len(ids), long_rows, desc=f"generating {split}")
        for kind, indices in plan.items():
            for index in indices:
                apply_trap(kind, rows[index], rng, split)
        trap_ids[split] = {kind: [ids[i] for i in indices] for kind, indices in plan.items()}
        frames[split] = _to_frame(rows, ids, with_labels=split == "train")
    submission = pl.DataFrame(
        {"id": test_ids, **{c: [1 / 3] * n_test for c in LABEL_COLUMNS}},
        schema={"id": pl.Int64, **dict.fromkeys(LABEL_COLUMNS, pl.Float64)},
    )
    return SampleData(
        train=frames["train"], test=frames["test"], sample_submission=submission, traps=trap_ids
    )


def generate_competition_files(
    out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleFiles:
    """Write train.csv, test.csv, sample_submission.csv (LMSYS format) in `out_dir`; same seed, same bytes."""
    data = generate_competition_frames(n_train=n_train, n_test=n_test, seed=seed, traps=traps)
    return _write_sample_files(out_dir, data, ".csv")


def _write_sample_files(out_dir: str | Path, data: Any, suffix: str) -> SampleFiles:
    """train/test in the competition's file type (`.csv` LMSYS, `.parquet` WSDM) and sample_submission.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = SampleFiles(
        train_csv=out / f"train{suffix}",
        test_csv=out / f"test{suffix}",
        sample_submission_csv=out / "sample_submission.csv",
        traps=data.traps,
    )
    for frame, path in ((data.train, files.train_csv), (data.test, files.test_csv)):
        if suffix == ".parquet":
            frame.write_parquet(path)
        else:
            frame.write_csv(path)
    data.sample_submission.write_csv(files.sample_submission_csv, float_precision=6)
    return files


def _make_ids(rng: np.random.Generator, n: int) -> np.ndarray:
    """Increasing, unique, Kaggle-looking integer ids (the real train file is sorted by id)."""
    return 30_000 + np.cumsum(rng.integers(1, 150_000, size=n))


def _to_frame(rows: list[SampleRow], ids: list[int], with_labels: bool) -> pl.DataFrame:
    columns: dict[str, list[Any]] = {"id": ids}
    if with_labels:
        columns["model_a"] = [row.model_a for row in rows]
        columns["model_b"] = [row.model_b for row in rows]
    for name in ("prompt", "response_a", "response_b"):
        columns[name] = [row.raw[name] if name in row.raw else cell_json(getattr(row, name)) for row in rows]
    if with_labels:
        for k, column in enumerate(LABEL_COLUMNS):
            columns[column] = [int(row.label == k) for row in rows]
    schema = {name: pl.String for name in columns}
    schema["id"] = pl.Int64
    if with_labels:
        schema.update(dict.fromkeys(LABEL_COLUMNS, pl.Int64))
    return pl.DataFrame(columns, schema=schema)


# ------------------------------------------------------------------------------------------------------ WSDM
# language -> (share of rows, a phrase in it added to the prompt)
WSDM_LANGUAGES: dict[str, tuple[float, str]] = {
    "English": (0.55, ""),
    "Russian": (0.12, "Пожалуйста, ответь подробно. "),
    "Chinese": (0.12, "请详细回答这个问题。"),
    "Spanish": (0.11, "Por favor, responde con detalle. "),
    "German": (0.10, "Bitte antworte ausführlich. "),
}


_WSDM_TRAIN_COLUMNS = ("prompt", "response_a", "response_b", "winner", "model_a", "model_b", "language")


def generate_wsdm_frames(
    n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleData:
    """The WSDM Cup files as polars frames: train (string `id`, `winner`, `language`), test (int `id`,
    `scored`), sample_submission (`id, winner`). Same signal as LMSYS, ties dropped, turns joined per side."""
    rng = np.random.default_rng(seed)
    cells = _wsdm_cells(rng, n_train + n_test)
    order = rng.permutation(n_train + n_test)
    train_cells = [cells[i] for i in order[:n_train]]
    test_cells = [cells[i] for i in order[n_train:]]
    train_ids = [rng.bytes(20).hex() for _ in range(n_train)]
    test_ids = (1_000_000 + np.cumsum(rng.integers(1, 5_000, size=n_test))).tolist()
    trap_ids: dict[str, dict[str, list]] = {}
    for split, split_cells, ids in (("train", train_cells, train_ids), ("test", test_cells, test_ids)):
        plan = plan_traps(rng, len(split_cells), WSDM_TRAP_RATES) if traps else {}
        for kind, indices in plan.items():
            for index in indices:
                apply_wsdm_trap(kind, split_cells[index], rng)
        trap_ids[split] = {kind: [ids[i] for i in indices] for kind, indices in plan.items()}
    train = pl.DataFrame(
        {"id": train_ids, **{c: [cell[c] for cell in train_cells] for c in _WSDM_TRAIN_COLUMNS}},
        schema={"id": pl.String, **dict.fromkeys(_WSDM_TRAIN_COLUMNS, pl.String)},
    )
    test_columns = ("prompt", "response_a", "response_b")
    test = pl.DataFrame(
        {
            "id": test_ids,
            **{c: [cell[c] for cell in test_cells] for c in test_columns},
            "scored": (rng.random(n_test) < 0.5).tolist(),
        },
        schema={"id": pl.Int64, **dict.fromkeys(test_columns, pl.String), "scored": pl.Boolean},
    )
    submission = pl.DataFrame(
        {"id": test_ids, "winner": ["model_a"] * n_test}, schema={"id": pl.Int64, "winner": pl.String}
    )
    return SampleData(train=train, test=test, sample_submission=submission, traps=trap_ids)


def _wsdm_cells(rng: np.random.Generator, needed: int) -> list[dict[str, Any]]:
    """`needed` non-tie rows as WSDM cells (one string per side, a language phrase before the prompt)."""
    text = TextMaker(rng)
    rows: list[SampleRow] = []
    while len(rows) < needed:
        batch = generate_rows(
            rng, text, max(64, int((needed - len(rows)) * 1.6)), set(), desc="generating wsdm"
        )
        rows += [row for row in batch if row.label != 2]
    languages = list(WSDM_LANGUAGES)
    shares = np.array([share for share, _ in WSDM_LANGUAGES.values()])
    language = rng.choice(len(languages), size=needed, p=shares / shares.sum())
    return [
        {
            "prompt": WSDM_LANGUAGES[languages[lang]][1] + "\n\n".join(row.prompt),
            "response_a": "\n\n".join(row.response_a),
            "response_b": "\n\n".join(row.response_b),
            "winner": ("model_a", "model_b")[row.label],
            "model_a": row.model_a,
            "model_b": row.model_b,
            "language": languages[lang],
        }
        for row, lang in zip(rows[:needed], language, strict=True)
    ]


def generate_wsdm_files(
    out_dir: str | Path, n_train: int = 2000, n_test: int = 200, seed: int = 0, traps: bool = True
) -> SampleFiles:
    """Write train.parquet, test.parquet, sample_submission.csv (WSDM Cup format) in `out_dir`."""
    data = generate_wsdm_frames(n_train=n_train, n_test=n_test, seed=seed, traps=traps)
    return _write_sample_files(out_dir, data, ".parquet")


# ----------------------------------------------------------------------------------------------------- stats
def sample_stats(frame: pl.DataFrame) -> dict[str, Any]:
    """Shape of a loaded frame (ARCHITECTURE.md layout): class balance, turns, shared prompts, lengths."""
    prompt_key = frame["prompt"].list.join("\n")
    response_chars = pl.concat(
        [frame[c].list.join("\n").str.len_chars() for c in ("response_a", "response_b")]
    ).cast(pl.Float64)
    stats: dict[str, Any] = {
        "rows": frame.height,
        "distinct_prompts": prompt_key.n_unique(),
        "multi_turn_share": float((frame["prompt"].list.len() > 1).mean() or 0.0),
        "response_chars_median": float(response_chars.median() or 0.0),
        "response_share_over_5000": float((response_chars > 5000).mean() or 0.0),
        "responses_over_20000": int((response_chars > 20000).sum()),
        "prompt_chars_median": float(frame["prompt"].list.join("\n").str.len_chars().median() or 0.0),
    }
    labels = frame["label"].drop_nulls()
    if labels.len():
        stats["class_balance"] = {
            name: float((labels == k).mean()) for k, name in enumerate(("a", "b", "tie"))
        }
    return stats
