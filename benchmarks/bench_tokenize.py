"""Tokenisation speed of `encode_rows` and padding efficiency of the inference batches, at the real data size.

On a generated train file of 57,477 rows (long-tailed lengths like the real data) parsed by the data layer:
train the demo tokenizer on a subset, encode every row at max length 2048 and 1024 (target: the whole set in
<= 60 s), then compare the padding efficiency (real tokens / computed tokens) of token-budget batches
(target >= 0.95) with a fixed batch of 8 in file order. Also times the original+swapped pair (swap TTA).

`--tokenizers demo gemma2 gemma3 PATH...` also times real tokenizers (each at the first max length; Gemma-2
from $KAGGLE_UTILS_GEMMA2_TOKENIZER or <repo>/../shared/reference/tokenizers/gemma2, Gemma-3 from
<repo>/.cache/models/gemma-3-270m-*). `--long-cells N` puts N responses of 100k-400k characters into the data
(the real files have such cells). `--survivors` measures, per tokenizer, how much of the tokenisation goes to
text that truncation throws away: the share of tokens and characters kept, and the time of the tokenizer call
on every piece against the same call on only the surviving head and end of each piece (the ideal any
"tokenise only what can survive" scheme could reach; encode_rows cannot use it exactly, because the
proportional split needs every cut piece's full token count).

The development machine is shared: wall time depends on what else runs, so CPU seconds and the load average
are recorded too; compare the ratios within one run. Prints a table and writes
benchmarks/results/bench_tokenize.json. Run: `.venv/bin/python benchmarks/bench_tokenize.py`.
"""

from __future__ import annotations

import os

# Batch tokenisation parallelises over rows in Rust; tests turn this off, the benchmark measures it on.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import argparse  # noqa: E402
import datetime as dt  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import polars as pl  # noqa: E402
import tokenizers  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

import kaggle_utils  # noqa: E402
from kaggle_utils.core.config import FormatConfig, InferenceConfig  # noqa: E402
from kaggle_utils.core.machine import cpu_name as cpu_model
from kaggle_utils.core.machine import total_memory_gb
from kaggle_utils.data.load import load_competition  # noqa: E402
from kaggle_utils.data.sample import generate_competition_files  # noqa: E402
from kaggle_utils.text.batching import LengthBucketSampler, padding_efficiency, token_budget_batches  # noqa: E402
from kaggle_utils.text.encode import ROWS_PER_CHUNK, TURN_COLUMNS, encode_both_orders, encode_rows  # noqa: E402
from kaggle_utils.text.template import TEMPLATE_VERSION, template_ids  # noqa: E402
from kaggle_utils.text.tokenizer import load_tokenizer, train_demo_tokenizer  # noqa: E402
from kaggle_utils.text.truncation import _head_tokens, _turn_keep  # noqa: E402

REAL_TRAIN_ROWS = 57_477
TARGET_SECONDS = 60.0
TARGET_EFFICIENCY = 0.95
RESULTS = Path(__file__).resolve().parent / "results" / "bench_tokenize.json"
REPO = Path(__file__).resolve().parents[1]
GEMMA2_ENV = "KAGGLE_UTILS_GEMMA2_TOKENIZER"
LONG_CELL_CHARS = (100_000, 400_000)


def device_description() -> dict[str, object]:
    """CPU model, usable cores, memory and the load average (the machine is shared)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": cpu_model(), "cores": cores, "memory_gb": total_memory_gb(),
            "platform": platform.platform(), "gpu": "none (CPU only)"}  # fmt: skip


def load_average() -> list[float] | None:
    return [round(x, 2) for x in os.getloadavg()] if hasattr(os, "getloadavg") else None


def timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def file_order_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]


def batch_stats(lengths: np.ndarray, batches: list[list[int]]) -> dict[str, float]:
    computed = sum(int(lengths[b].max()) * len(b) for b in batches)
    return {"batches": len(batches), "computed_tokens": computed,
            "padding_efficiency": round(padding_efficiency(lengths, batches), 4)}  # fmt: skip


def tokenizer_dir(spec: str) -> Path:
    """A real tokenizer's directory: "gemma2", "gemma3" (the checkouts' usual places) or a path."""
    if spec == "gemma2":
        return Path(
            os.environ.get(GEMMA2_ENV) or REPO.parent / "shared" / "reference" / "tokenizers" / "gemma2"
        )
    if spec == "gemma3":
        found = sorted((REPO / ".cache" / "models").glob("gemma-3-270m-*/tokenizer.json"))
        if not found:
            raise SystemExit(
                f"no Gemma-3 tokenizer under {REPO / '.cache' / 'models'} (gemma-3-270m-*/tokenizer.json)"
            )
        return found[0].parent
    return Path(spec)


def with_long_cells(frame: pl.DataFrame, n: int, seed: int) -> pl.DataFrame:
    """``n`` rows whose first response A is 100k-400k characters of other responses, as the real data has."""
    if n <= 0:
        return frame
    rng = np.random.default_rng(seed + 1)
    pool = "\n\n".join(frame["response_b"].explode().head(5000).to_list())
    while len(pool) < 2 * LONG_CELL_CHARS[1]:
        pool += "\n\n" + pool
    column = frame["response_a"].to_list()
    for row in rng.choice(frame.height, size=min(n, frame.height), replace=False).tolist():
        length = int(rng.integers(*LONG_CELL_CHARS))
        start = int(rng.integers(0, len(pool) - length))
        column[row] = [pool[start : start + length], *column[row][1:]]
    return frame.with_columns(pl.Series("response_a", column, dtype=pl.List(pl.String)))


def call_tokenizer(tokenizer, texts: list[str], **extra):
    """The batch call encode_rows makes (ids only), or with ``extra`` outputs (offsets) as a BatchEncoding."""
    encoded = tokenizer(texts, add_special_tokens=False, split_special_tokens=True,
                        return_attention_mask=False, return_token_type_ids=False, verbose=False,
                        **extra)  # fmt: skip
    return encoded if extra else encoded["input_ids"]


def surviving_text(frame: pl.DataFrame, tokenizer, cfg: FormatConfig) -> tuple[list[str], dict[str, int]]:
    """Per piece, the characters under the tokens encode_rows keeps (all of a whole piece; the head and the
    end of a cut one, as two strings; nothing of a dropped turn), with token and character totals."""
    ids = template_ids(tokenizer, cfg)
    survivors: list[str] = []
    totals = {"tokens": 0, "kept_tokens": 0, "chars": 0, "kept_chars": 0, "pieces": 0, "cut_pieces": 0}
    for start in range(0, frame.height, ROWS_PER_CHUNK):
        chunk = frame.slice(start, ROWS_PER_CHUNK)
        texts = [text for name in TURN_COLUMNS for text in chunk[name].explode().to_list()]
        encoded = call_tokenizer(tokenizer, texts, return_offsets_mapping=True)
        tokens, offsets, n = encoded["input_ids"], encoded["offset_mapping"], len(texts) // 3
        position = 0
        for count in chunk["prompt"].list.len().to_list():
            pieces = [[position + turn + k * n for k in range(3)] for turn in range(count)]
            keep = _turn_keep([tuple(len(tokens[i]) for i in turn) for turn in pieces], ids, cfg.max_length,
                              cfg.truncation, cfg.cut_split)  # fmt: skip
            for turn, indices in enumerate(pieces):
                for k, index in enumerate(indices):
                    text, length = texts[index], len(tokens[index])
                    kept = keep[turn][k] if turn in keep else 0
                    totals["tokens"] += length
                    totals["chars"] += len(text)
                    totals["pieces"] += 1
                    totals["kept_tokens"] += min(kept, length)
                    if kept >= length:
                        survivors.append(text)
                        totals["kept_chars"] += len(text)
                        continue
                    totals["cut_pieces"] += 1
                    head = _head_tokens(kept, cfg.head_fraction) if kept else 0
                    parts = [
                        text[: offsets[index][head - 1][1]] if head else "",
                        text[offsets[index][length - (kept - head)][0] :] if kept - head else "",
                    ]
                    survivors += [part for part in parts if part]
                    totals["kept_chars"] += sum(map(len, parts))
            position += count
    return survivors, totals


def all_pieces(frame: pl.DataFrame) -> list[list[str]]:
    """The texts of every piece in encode_rows' chunks (the same batch calls it makes)."""
    return [[text for name in TURN_COLUMNS
             for text in frame.slice(start, ROWS_PER_CHUNK)[name].explode().to_list()]
            for start in range(0, frame.height, ROWS_PER_CHUNK)]  # fmt: skip


def survivors_run(
    frame: pl.DataFrame, tokenizer, cfg: FormatConfig, run: dict[str, object]
) -> dict[str, object]:
    """Tokenising every piece vs only what survives truncation: kept shares and the two call times.

    ``run`` is encode_rows' run at the same max length: its token counts must match, or the surviving text
    measured here is not what encode_rows keeps.
    """
    survivors, totals = surviving_text(frame, tokenizer, cfg)
    if (totals["tokens"], totals["kept_tokens"]) != (run["content_tokens"], run["kept_tokens"]):
        raise RuntimeError(f"surviving-text count {totals} disagrees with encode_rows "
                           f"{run['content_tokens']} / {run['kept_tokens']} tokens"
                           " (content / kept)")  # fmt: skip
    batches = all_pieces(frame)
    size = max(1, len(survivors) // max(1, len(batches)) + 1)
    _, full_wall, full_cpu = timed(lambda: [call_tokenizer(tokenizer, batch) for batch in batches])
    _, kept_wall, kept_cpu = timed(lambda: [call_tokenizer(tokenizer, survivors[i : i + size])
                                            for i in range(0, len(survivors), size)])  # fmt: skip
    return {
        "max_length": cfg.max_length,
        **totals,
        "kept_token_share": round(totals["kept_tokens"] / max(1, totals["tokens"]), 4),
        "kept_char_share": round(totals["kept_chars"] / max(1, totals["chars"]), 4),
        "all_pieces_call_wall_seconds": round(full_wall, 2),
        "all_pieces_call_cpu_seconds": round(full_cpu, 2),
        "surviving_text_call_wall_seconds": round(kept_wall, 2),
        "surviving_text_call_cpu_seconds": round(kept_cpu, 2),
        "surviving_over_all_cpu": round(kept_cpu / max(full_cpu, 1e-9), 3),
    }


def encode_run(
    frame: pl.DataFrame, tokenizer, max_length: int, total_chars: int, fixed_batch: int, token_budget: int
) -> dict[str, object]:
    """One timed encode_rows pass and what it produced (lengths, truncation, padding efficiency)."""
    cfg = FormatConfig(max_length=max_length)
    encoded, wall, cpu = timed(lambda: encode_rows(frame, tokenizer, cfg, progress=True))
    lengths = encoded.lengths
    content = encoded.content_tokens.sum(axis=0)
    kept_share = encoded.kept_tokens.sum(axis=0) / np.maximum(content, 1)
    bucket = LengthBucketSampler(lengths, fixed_batch, seed=0)
    return {
        "max_length": max_length,
        "wall_seconds": round(wall, 2),
        "cpu_seconds": round(cpu, 2),
        "rows_per_second": round(len(encoded) / wall, 1),
        "target_met": wall <= TARGET_SECONDS,
        "content_tokens": int(content.sum()),
        "kept_tokens": int(encoded.kept_tokens.sum()),
        "content_tokens_per_second": round(float(content.sum()) / wall, 1),
        "chars_per_token": round(total_chars / float(content.sum()), 3),
        "length_mean": round(float(lengths.mean()), 1),
        "length_p50": int(np.percentile(lengths, 50)),
        "length_p95": int(np.percentile(lengths, 95)),
        "rows_at_max_length": int((lengths == max_length).sum()),
        "truncated_share": round(float(encoded.truncated.mean()), 4),
        "kept_share": {
            name: round(float(share), 4) for name, share in zip(TURN_COLUMNS, kept_share, strict=True)
        },
        "token_budget": batch_stats(lengths, token_budget_batches(lengths, token_budget)),
        "fixed_batch_file_order": batch_stats(lengths, file_order_batches(len(lengths), fixed_batch)),
        "length_buckets_train": batch_stats(lengths, list(bucket)),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=REAL_TRAIN_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--tokenizer-rows", type=int, default=5000, help="rows whose text trains the tokenizer"
    )
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument("--token-budget", type=int, default=InferenceConfig().token_budget)
    parser.add_argument("--fixed-batch", type=int, default=8)
    parser.add_argument("--skip-pair", action="store_true", help="skip timing encode_both_orders")
    parser.add_argument(
        "--tokenizers",
        nargs="+",
        default=["demo"],
        help="demo, gemma2, gemma3 or tokenizer directories; real ones run at the first max length",
    )
    parser.add_argument("--long-cells", type=int, default=0, help="responses of 100k-400k characters to add")
    parser.add_argument(
        "--survivors",
        action="store_true",
        help="also time tokenising only the text that survives truncation (first max length)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as workdir:
        files, generate_s, _ = timed(lambda: generate_competition_files(workdir, n_train=args.rows, n_test=10,
                                                                         seed=args.seed))  # fmt: skip
        loaded, load_s, _ = timed(lambda: load_competition(files.train_csv, split="train"))
    frame = with_long_cells(loaded.frame, args.long_cells, args.seed)
    subset = frame.head(args.tokenizer_rows)
    texts = [text for name in TURN_COLUMNS for text in subset[name].explode().to_list()]
    tokenizer, train_s, _ = timed(lambda: train_demo_tokenizer(texts, None, vocab_size=args.vocab_size))
    total_chars = int(sum(frame[name].list.join("").str.len_chars().sum() for name in TURN_COLUMNS))

    runs, survivors, real = [], None, []
    if "demo" in args.tokenizers:
        for max_length in args.max_lengths:
            runs.append(
                encode_run(frame, tokenizer, max_length, total_chars, args.fixed_batch, args.token_budget)
            )
        if args.survivors:
            survivors = survivors_run(frame, tokenizer, FormatConfig(max_length=args.max_lengths[0]), runs[0])
    for spec in (spec for spec in args.tokenizers if spec != "demo"):
        folder = tokenizer_dir(spec)
        real_tokenizer, real_load_s, _ = timed(lambda folder=folder: load_tokenizer(folder))
        entry = {"name": spec, "path": str(folder), "vocab_size": len(real_tokenizer),
                 "load_seconds": round(real_load_s, 2),
                 "run": encode_run(frame, real_tokenizer, args.max_lengths[0], total_chars, args.fixed_batch,
                                   args.token_budget)}  # fmt: skip
        if args.survivors:
            entry["survivors"] = survivors_run(
                frame, real_tokenizer, FormatConfig(max_length=args.max_lengths[0]), entry["run"]
            )
        real.append(entry)
        del real_tokenizer

    pair = None
    if not args.skip_pair:
        cfg = FormatConfig(max_length=args.max_lengths[0])
        _, wall, cpu = timed(lambda: encode_both_orders(frame, tokenizer, cfg, progress=True))
        pair = {"max_length": cfg.max_length, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                "rows_per_second": round(frame.height / wall, 1)}  # fmt: skip
    load_after = load_average()

    print(f"\nbench_tokenize: {frame.height:,} rows kept of a generated {args.rows:,}-row train file"
          f" (seed {args.seed}); demo BPE vocab {len(tokenizer):,} trained on {len(texts):,} texts"
          f" in {train_s:.1f} s; load average {load_before} -> {load_after}"
          f" on {device_description()['cores']} cores")  # fmt: skip
    header = (f"{'max_len':>7} {'wall s':>7} {'cpu s':>7} {'rows/s':>8} {'<=60s':>6} {'tok/row':>8} "
              f"{'trunc':>6} {'eff budget':>10} {'eff fixed8':>10} {'eff bucket8':>11} "
              f"{'batches b/f':>12}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for run in runs:
        print(f"{run['max_length']:>7} {run['wall_seconds']:>7.1f} {run['cpu_seconds']:>7.1f} "
              f"{run['rows_per_second']:>8,.0f} {'yes' if run['target_met'] else 'NO':>6} "
              f"{run['content_tokens'] / frame.height:>8.0f} {run['truncated_share']:>6.1%} "
              f"{run['token_budget']['padding_efficiency']:>10.4f} "
              f"{run['fixed_batch_file_order']['padding_efficiency']:>10.4f} "
              f"{run['length_buckets_train']['padding_efficiency']:>11.4f} "
              f"{run['token_budget']['batches']:>5}/"
              f"{run['fixed_batch_file_order']['batches']:<6}")  # fmt: skip
    for entry in real:
        run = entry["run"]
        print(
            f"{entry['name']:>7} {run['wall_seconds']:>7.1f} {run['cpu_seconds']:>7.1f} "
            f"{run['rows_per_second']:>8,.0f} {'yes' if run['target_met'] else 'NO':>6} "
            f"{run['content_tokens'] / frame.height:>8.0f} {run['truncated_share']:>6.1%}  "
            f"(at {run['max_length']})"
        )
    measured = ([("demo", survivors)] if survivors else []) + [
        (e["name"], e["survivors"]) for e in real if "survivors" in e
    ]
    for name, measure in measured:
        print(
            f"{name}: truncation keeps {measure['kept_token_share']:.1%} of tokens, "
            f"{measure['kept_char_share']:.1%} of characters; tokenizer call on all pieces "
            f"{measure['all_pieces_call_wall_seconds']:.1f} s wall / "
            f"{measure['all_pieces_call_cpu_seconds']:.1f} s CPU, "
            f"on surviving text only {measure['surviving_text_call_wall_seconds']:.1f} s / "
            f"{measure['surviving_text_call_cpu_seconds']:.1f} s "
            f"(CPU ratio {measure['surviving_over_all_cpu']:.3f})"
        )
    if pair:
        print(
            f"original + swapped pair at {pair['max_length']}: {pair['wall_seconds']:.1f} s wall, "
            f"{pair['cpu_seconds']:.1f} s CPU ({pair['rows_per_second']:,.0f} rows/s)"
        )
    print(
        f"token budget {args.token_budget} per batch; targets: <= {TARGET_SECONDS:.0f} s per pass, "
        f"token-budget efficiency >= {TARGET_EFFICIENCY}"
    )

    result = {
        "benchmark": "bench_tokenize",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device_description(),
        "load_average_before_after": [load_before, load_after],
        "versions": {
            "python": sys.version.split()[0],
            "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
            "polars": pl.__version__,
            "numpy": np.__version__,
            "kaggle_utils": kaggle_utils.__version__,
            "template_version": TEMPLATE_VERSION,
        },  # fmt: skip
        "params": {
            **{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM"),
        },  # fmt: skip
        "data": {
            "rows_generated": args.rows,
            "rows_kept": frame.height,
            "generate_seconds": round(generate_s, 2),
            "load_seconds": round(load_s, 2),
            "content_chars": total_chars,
            "multi_turn_share": round(float((frame["prompt"].list.len() > 1).mean()), 4),
            "long_cells": args.long_cells,
            "longest_cell_chars": int(
                max(frame[name].explode().str.len_chars().max() for name in TURN_COLUMNS)
            ),
        },
        # fmt: skip
        "tokenizer": {
            "vocab_size": len(tokenizer),
            "train_texts": len(texts),
            "train_seconds": round(train_s, 2),
        },
        "targets": {"seconds": TARGET_SECONDS, "token_budget_efficiency": TARGET_EFFICIENCY},
        "runs": runs,
        "survivors": survivors,
        "real_tokenizers": real,
        "pair_original_and_swapped": pair,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
