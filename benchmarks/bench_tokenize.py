"""Tokenisation speed of `encode_rows` and padding efficiency of the inference batches, at the real data size.

On a generated train file of 57,477 rows (long-tailed lengths like the real data) parsed by the data layer:
train the demo tokenizer on a subset, encode every row at max length 2048 and 1024 (target: the whole set in
<= 60 s), then compare the padding efficiency (real tokens / computed tokens) of token-budget batches
(target >= 0.95) with a fixed batch of 8 in file order. Also times the original+swapped pair (swap TTA).

The development machine is shared: wall time depends on what else runs, so CPU seconds and the load average
are recorded too. Prints a table and writes benchmarks/results/bench_tokenize.json.
Run: `.venv/bin/python benchmarks/bench_tokenize.py`.
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
from kaggle_utils.batching import LengthBucketSampler, padding_efficiency, token_budget_batches  # noqa: E402
from kaggle_utils.config import FormatConfig, InferenceConfig  # noqa: E402
from kaggle_utils.data import load_competition  # noqa: E402
from kaggle_utils.formatting import TEMPLATE_VERSION, TURN_COLUMNS, encode_both_orders, encode_rows  # noqa: E402
from kaggle_utils.runtime import cpu_model, total_memory_gb  # noqa: E402
from kaggle_utils.sample import generate_competition_files  # noqa: E402
from kaggle_utils.tokenizer import train_demo_tokenizer  # noqa: E402

REAL_TRAIN_ROWS = 57_477
TARGET_SECONDS = 60.0
TARGET_EFFICIENCY = 0.95
RESULTS = Path(__file__).resolve().parent / "results" / "bench_tokenize.json"


def device_description() -> dict[str, object]:
    """CPU model, usable cores, memory and the load average (the machine is shared)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu_model": cpu_model(), "cores": cores, "memory_gb": total_memory_gb(), "platform": platform.platform(),
            "gpu": "none (CPU only)"}  # fmt: skip


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=REAL_TRAIN_ROWS)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tokenizer-rows", type=int, default=5000, help="rows whose text trains the tokenizer")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--max-lengths", type=int, nargs="+", default=[2048, 1024])
    parser.add_argument("--token-budget", type=int, default=InferenceConfig().token_budget)
    parser.add_argument("--fixed-batch", type=int, default=8)
    parser.add_argument("--skip-pair", action="store_true", help="skip timing encode_both_orders")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = load_average()

    with tempfile.TemporaryDirectory(prefix="bench_tokenize_") as workdir:
        files, generate_s, _ = timed(lambda: generate_competition_files(workdir, n_train=args.rows, n_test=10,
                                                                         seed=args.seed))  # fmt: skip
        loaded, load_s, _ = timed(lambda: load_competition(files.train_csv, split="train"))
    frame = loaded.frame
    subset = frame.head(args.tokenizer_rows)
    texts = [text for name in TURN_COLUMNS for text in subset[name].explode().to_list()]
    tokenizer, train_s, _ = timed(lambda: train_demo_tokenizer(texts, None, vocab_size=args.vocab_size))
    total_chars = int(sum(frame[name].list.join("").str.len_chars().sum() for name in TURN_COLUMNS))

    runs = []
    for max_length in args.max_lengths:
        cfg = FormatConfig(max_length=max_length)
        encoded, wall, cpu = timed(lambda cfg=cfg: encode_rows(frame, tokenizer, cfg, progress=True))
        lengths = encoded.lengths
        content = encoded.content_tokens.sum(axis=0)
        kept_share = encoded.kept_tokens.sum(axis=0) / np.maximum(content, 1)
        bucket = LengthBucketSampler(lengths, args.fixed_batch, seed=0)
        runs.append({
            "max_length": max_length,
            "wall_seconds": round(wall, 2),
            "cpu_seconds": round(cpu, 2),
            "rows_per_second": round(len(encoded) / wall, 1),
            "target_met": wall <= TARGET_SECONDS,
            "content_tokens": int(content.sum()),
            "content_tokens_per_second": round(float(content.sum()) / wall, 1),
            "chars_per_token": round(total_chars / float(content.sum()), 3),
            "length_mean": round(float(lengths.mean()), 1),
            "length_p50": int(np.percentile(lengths, 50)),
            "length_p95": int(np.percentile(lengths, 95)),
            "rows_at_max_length": int((lengths == max_length).sum()),
            "truncated_share": round(float(encoded.truncated.mean()), 4),
            "kept_share": {name: round(float(share), 4) for name, share in zip(TURN_COLUMNS, kept_share, strict=True)},
            "token_budget": batch_stats(lengths, token_budget_batches(lengths, args.token_budget)),
            "fixed_batch_file_order": batch_stats(lengths, file_order_batches(len(lengths), args.fixed_batch)),
            "length_buckets_train": batch_stats(lengths, list(bucket)),
        })
        del encoded

    pair = None
    if not args.skip_pair:
        cfg = FormatConfig(max_length=args.max_lengths[0])
        _, wall, cpu = timed(lambda: encode_both_orders(frame, tokenizer, cfg, progress=True))
        pair = {"max_length": cfg.max_length, "wall_seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                "rows_per_second": round(frame.height / wall, 1)}  # fmt: skip
    load_after = load_average()

    print(f"\nbench_tokenize: {frame.height:,} rows kept of a generated {args.rows:,}-row train file (seed {args.seed});"
          f" demo BPE vocab {len(tokenizer):,} trained on {len(texts):,} texts in {train_s:.1f} s;"
          f" load average {load_before} -> {load_after} on {device_description()['cores']} cores")  # fmt: skip
    header = (f"{'max_len':>7} {'wall s':>7} {'cpu s':>7} {'rows/s':>8} {'<=60s':>6} {'tok/row':>8} {'trunc':>6} "
              f"{'eff budget':>10} {'eff fixed8':>10} {'eff bucket8':>11} {'batches b/f':>12}")  # fmt: skip
    print(header)
    print("-" * len(header))
    for run in runs:
        print(f"{run['max_length']:>7} {run['wall_seconds']:>7.1f} {run['cpu_seconds']:>7.1f} "
              f"{run['rows_per_second']:>8,.0f} {'yes' if run['target_met'] else 'NO':>6} "
              f"{run['content_tokens'] / frame.height:>8.0f} {run['truncated_share']:>6.1%} "
              f"{run['token_budget']['padding_efficiency']:>10.4f} "
              f"{run['fixed_batch_file_order']['padding_efficiency']:>10.4f} "
              f"{run['length_buckets_train']['padding_efficiency']:>11.4f} "
              f"{run['token_budget']['batches']:>5}/{run['fixed_batch_file_order']['batches']:<6}")  # fmt: skip
    if pair:
        print(f"original + swapped pair at {pair['max_length']}: {pair['wall_seconds']:.1f} s wall, "
              f"{pair['cpu_seconds']:.1f} s CPU ({pair['rows_per_second']:,.0f} rows/s)")
    print(f"token budget {args.token_budget} per batch; targets: <= {TARGET_SECONDS:.0f} s per pass, "
          f"token-budget efficiency >= {TARGET_EFFICIENCY}")

    result = {
        "benchmark": "bench_tokenize",
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "device": device_description(),
        "load_average_before_after": [load_before, load_after],
        "versions": {
            "python": sys.version.split()[0], "tokenizers": tokenizers.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "polars": pl.__version__,
            "numpy": np.__version__, "kaggle_utils": kaggle_utils.__version__, "template_version": TEMPLATE_VERSION,
        },  # fmt: skip
        "params": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                   "TOKENIZERS_PARALLELISM": os.environ.get("TOKENIZERS_PARALLELISM")},  # fmt: skip
        "data": {"rows_generated": args.rows, "rows_kept": frame.height, "generate_seconds": round(generate_s, 2),
                 "load_seconds": round(load_s, 2), "content_chars": total_chars,
                 "multi_turn_share": round(float((frame["prompt"].list.len() > 1).mean()), 4)},  # fmt: skip
        "tokenizer": {"vocab_size": len(tokenizer), "train_texts": len(texts), "train_seconds": round(train_s, 2)},
        "targets": {"seconds": TARGET_SECONDS, "token_budget_efficiency": TARGET_EFFICIENCY},
        "runs": runs,
        "pair_original_and_swapped": pair,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
