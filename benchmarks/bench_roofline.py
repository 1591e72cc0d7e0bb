"""Real-weights throughput against this machine's own matmul roofline (CPU or GPU).

Measures, in one run on the same threads: the best matmul rate of the machine in fp32 and bf16 (square GEMMs,
the roofline), then for each real checkpoint given (`fetch-model` folders: Gemma 3 270M, SmolLM2-135M) the
tokens/s of a forward pass and of a LoRA training step (r16 on all linear layers, AdamW) at one sequence
length, in fp32 and under bf16 autocast. Each is turned into achieved FLOP/s (forward 2 N, LoRA step 4 N per
token: the frozen weights take no weight gradient; N = parameters outside the embeddings, whose lookup is no
matmul) and a ratio to the best matmul rate. Prints a table and writes JSON with the date, threads and load.

    .venv/bin/python benchmarks/bench_roofline.py \
        --model-dir models/gemma-3-270m --model-dir models/smollm2-135m \
        [--seq-len 256] [--batch 4] [--steps 3] [--threads N] [--out benchmarks/results/roofline.json]
    .venv/bin/python benchmarks/bench_roofline.py --tiny   # the 2-layer random model, a smoke run
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import time
from pathlib import Path

import torch

from kaggle_utils.core.config import LoraSettings, ModelConfig
from kaggle_utils.core.machine import describe_machine
from kaggle_utils.models.classifier import apply_lora, build_classifier

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def matmul_rate(dtype: torch.dtype, sizes=(512, 1024, 2048), seconds: float = 1.0) -> float:
    """Best FLOP/s over square matmuls of `sizes` in `dtype` (2 n^3 per product), each run for ~`seconds`."""
    best = 0.0
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        count, began = 0, time.perf_counter()
        while time.perf_counter() - began < seconds:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - began))
        if count <= 2:  # a product takes most of the time box: larger sizes would take minutes
            break
    return best


def matmul_parameters(model: torch.nn.Module) -> int:
    """Parameters outside embeddings (what the per-token matmuls multiply by)."""
    embedded = {id(p) for m in model.modules() if isinstance(m, torch.nn.Embedding) for p in m.parameters()}
    return sum(p.numel() for p in model.parameters() if id(p) not in embedded)


def timed(step, steps: int) -> float:
    step()  # warm-up
    began = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - began) / steps


def measure(
    model_dir: str | None, seq_len: int, batch: int, steps: int, dtypes: dict[str, torch.dtype]
) -> dict:
    source = model_dir or "tiny"
    model = build_classifier(
        ModelConfig(base_model=source, gradient_checkpointing=False, dtype="float32"),
        vocab_size=512 if model_dir is None else None,
        pad_token_id=0,
        device="cpu",
    )
    n_matmul = matmul_parameters(model)
    vocab = model.config.vocab_size
    ids = torch.randint(10, vocab - 1, (batch, seq_len))
    mask = torch.ones_like(ids)
    tokens = batch * seq_len
    rows = []
    model.eval()
    for name, dtype in dtypes.items():

        def forward(dtype=dtype):
            with torch.no_grad(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                model(input_ids=ids, attention_mask=mask)

        seconds = timed(forward, steps)
        rows.append(
            {
                "what": "forward",
                "dtype": name,
                "tokens_per_s": tokens / seconds,
                "flops_per_s": 2 * n_matmul * tokens / seconds,
            }
        )
    lora = apply_lora(model, LoraSettings(r=16, alpha=32, dropout=0.0))
    lora.train()
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    labels = torch.zeros(batch, dtype=torch.long)
    for name, dtype in dtypes.items():

        def train_step(dtype=dtype):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = lora(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        seconds = timed(train_step, steps)
        rows.append(
            {
                "what": "LoRA step",
                "dtype": name,
                "tokens_per_s": tokens / seconds,
                "flops_per_s": 4 * n_matmul * tokens / seconds,
            }
        )
    return {
        "model": source,
        "model_type": model.config.model_type,
        "matmul_parameters": n_matmul,
        "seq_len": seq_len,
        "batch": batch,
        "steps": steps,
        "rows": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--model-dir", action="append", default=[], help="a real checkpoint folder (repeatable)"
    )
    parser.add_argument("--tiny", action="store_true", help="the 2-layer random model (smoke run)")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's, i.e. every core)")
    parser.add_argument("--out", default=str(RESULTS / "roofline.json"))
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.model_dir and not args.tiny:
        parser.error("give --model-dir (repeatable) or --tiny")
    torch.manual_seed(0)
    roofline = {name: matmul_rate(dtype) for name, dtype in DTYPES.items()}
    best = max(roofline.values())
    # a dtype whose matmuls run at under a quarter of the best (bf16 on a CPU without AVX-512 BF16 / AMX)
    # would take minutes a step: it is reported as a roofline figure only
    usable = {name: dtype for name, dtype in DTYPES.items() if roofline[name] >= best / 4}
    skipped = sorted(set(DTYPES) - set(usable))
    models = [measure(path, args.seq_len, args.batch, args.steps, usable) for path in args.model_dir]
    if args.tiny:
        models.append(measure(None, args.seq_len, args.batch, args.steps, usable))
    for model in models:
        for row in model["rows"]:
            row["of_fp32_matmul"] = row["flops_per_s"] / roofline["fp32"]
            row["of_best_matmul"] = row["flops_per_s"] / best
    result = {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        **describe_machine(),
        "device": {**describe_machine(), "kind": "cpu"},
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average_1m": os.getloadavg()[0],
        "matmul_flops_per_s": roofline,
        "dtypes_not_run": {name: f"matmul at {roofline[name] / best:.1%} of the best" for name in skipped},
        "models": models,
    }
    print(
        f"{result['date']}, {result['cpu']}, {result['torch_threads']} threads, "
        f"load {result['load_average_1m']:.2f}; "
        f"matmul roofline fp32 {roofline['fp32'] / 1e9:.0f} GFLOP/s, "
        f"bf16 {roofline['bf16'] / 1e9:.1f} GFLOP/s"
        + "".join(f"; {name} not run ({why})" for name, why in result["dtypes_not_run"].items())
    )
    print("| model | seq x batch | what | dtype | tokens/s | GFLOP/s | of fp32 matmul | of best matmul |")
    print("|---|---|---|---|---|---|---|---|")
    for model in models:
        for row in model["rows"]:
            print(
                f"| {Path(model['model']).name} ({model['matmul_parameters'] / 1e6:.0f}M matmul params) | "
                f"{model['seq_len']} x {model['batch']} | {row['what']} | {row['dtype']} | "
                f"{row['tokens_per_s']:.0f} | {row['flops_per_s'] / 1e9:.1f} | {row['of_fp32_matmul']:.0%} | "
                f"{row['of_best_matmul']:.0%} |"
            )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"-> {args.out}")


if __name__ == "__main__":
    main()
