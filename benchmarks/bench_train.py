"""Training memory and speed of both orderings: peak memory and training tokens/s per optimizer step.

GPU (CUDA present): the real Gemma-2-9B shape (kaggle_utils/resources/gemma-2-9b-config.json) with random
weights, 2048 tokens, batch 1, gradient checkpointing (non-reentrant), LoRA r64/alpha16 on all linear layers
with the head trained in full (the winners' settings), 8-bit AdamW, the hardware's 16-bit dtype:

- ft-then-quant: LoRA on the 16-bit base; target peak <= 40 GB.
- quant-then-ft: QLoRA on the NF4 (double-quant) base; target peak <= 16 GB (trainable on a 16 GB card).

It also runs the unsloth backend's save/reload check of the classification head and num_labels
(`training.check_unsloth_head_roundtrip`) on the tiny model when unsloth is installed.

CPU (no CUDA): the same code on the tiny 2-layer model, so the script stays alive in CI; the output and the
JSON say that the tiny model was measured on CPU (those numbers say nothing about the 9B targets).

Each ordering runs in its own subprocess, so peak memory (CUDA max allocated, reset after the model is built;
CPU peak RSS) belongs to that ordering alone. Prints a table and writes
benchmarks/results/bench_train_<cuda|cpu>.json with device, date and versions.

    .venv/bin/python benchmarks/bench_train.py [--steps 3] [--seq-len 2048] [--warmup 1]
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
TARGETS_GB = {"quant-then-ft": 16.0, "ft-then-quant": 40.0}
ORDERINGS = ("ft-then-quant", "quant-then-ft")
GB = 1e9


def nine_b_config_path() -> Path:
    from kaggle_utils.models.classifier import GEMMA2_9B_CONFIG

    return GEMMA2_9B_CONFIG


def run_ordering(ordering: str, seq_len: int, steps: int, warmup: int) -> dict:
    """Build the ordering's trainable model and time `steps` optimizer steps on random tokens.

    Runs in this process.
    """
    import torch

    from kaggle_utils.core.config import LoraSettings, ModelConfig, QuantConfig, TrainConfig
    from kaggle_utils.models.classifier import apply_lora, build_classifier, count_parameters
    from kaggle_utils.models.devices import resolve_dtype
    from kaggle_utils.train.model_setup import make_optimizer, mixed_precision_for, upcast_trainable
    from kaggle_utils.train.results import PeakMemory

    cuda = torch.cuda.is_available()
    device = torch.device("cuda:0" if cuda else "cpu")
    model_cfg = ModelConfig(
        base_model=str(nine_b_config_path()) if cuda else "tiny", gradient_checkpointing=True
    )
    vocab = None if cuda else 1024
    quant = QuantConfig(scheme="nf4", double_quant=True) if ordering == "quant-then-ft" else None
    torch.manual_seed(0)
    build_began = time.perf_counter()
    with PeakMemory(device) as build_memory:
        model = apply_lora(
            build_classifier(model_cfg, quant=quant, vocab_size=vocab, pad_token_id=0, device=device),
            LoraSettings(),
        )
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        upcast_trainable(model)
        optimizer = make_optimizer(model, TrainConfig(), device)
    build_s = time.perf_counter() - build_began
    trainable, total = count_parameters(model)
    precision = mixed_precision_for(model, device)
    autocast_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    scaler = torch.amp.GradScaler("cuda") if precision == "fp16" else None
    vocab_size = model.config.vocab_size
    model.train()
    times = []
    with PeakMemory(device) as train_memory:
        for step in range(warmup + steps):
            ids = torch.randint(3, vocab_size, (1, seq_len), device=device)
            labels = torch.randint(0, 3, (1,), device=device)
            if cuda:
                torch.cuda.synchronize()
            began = time.perf_counter()
            with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
                loss = model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels).loss
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize()
            if step >= warmup:
                times.append(time.perf_counter() - began)
    mean_step = sum(times) / len(times)
    result = {
        "ordering": ordering,
        "model": "gemma-2-9b shape, random weights"
        if cuda
        else "tiny 2-layer Gemma-2 (hidden 64), random weights",
        "device": device.type,
        "dtype": str(resolve_dtype("auto", device)).removeprefix("torch."),
        "mixed_precision": precision,
        "quant": "nf4 double-quant base" if quant else f"{str(resolve_dtype('auto', device))[6:]} base",
        "seq_len": seq_len,
        "batch_size": 1,
        "gradient_checkpointing": True,
        "lora": "r64/alpha16, all linear layers, score head in full",
        "optimizer": type(optimizer).__name__,
        "steps_timed": steps,
        "warmup_steps": warmup,
        "step_time_s": mean_step,
        "tokens_per_s": seq_len / mean_step,
        "trainable_params": trainable,
        "total_params": total,
        "build_time_s": build_s,
        "peak_cuda_gb": train_memory.peak_cuda_bytes / GB if train_memory.peak_cuda_bytes else None,
        "peak_cuda_gb_while_building": build_memory.peak_cuda_bytes / GB
        if build_memory.peak_cuda_bytes
        else None,
        "peak_rss_gb": train_memory.peak_rss_bytes / GB,
        "last_loss": float(loss.detach()),
    }
    if cuda:
        result["target_gb"] = TARGETS_GB[ordering]
        result["meets_target"] = result["peak_cuda_gb"] <= TARGETS_GB[ordering]
    return result


def run_unsloth_check() -> dict:
    """GPU only: train the tiny model a few steps through unsloth, save merged, reload, check the head."""
    import torch

    from kaggle_utils.core.config import PipelineConfig
    from kaggle_utils.core.errors import UsageError
    from kaggle_utils.models.classifier import materialize_base
    from kaggle_utils.text.tokenizer import train_demo_tokenizer
    from kaggle_utils.train.head_roundtrip import check_unsloth_head_roundtrip
    from kaggle_utils.train.model_setup import build_unsloth_classifier, make_optimizer

    try:
        import unsloth  # noqa: F401
    except ImportError as error:
        return {"status": "skipped", "reason": f"unsloth not importable: {error}"}
    with tempfile.TemporaryDirectory() as tmp:
        words = [f"word{i} thing{i % 7} item{i % 13}" for i in range(2000)]
        tokenizer = train_demo_tokenizer(words, Path(tmp) / "tok", vocab_size=512)
        cfg = PipelineConfig()
        cfg.train.backend = "unsloth"
        cfg.format.max_length = 256
        cfg.model.base_model = str(
            materialize_base(
                cfg.model, Path(tmp) / "base", vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id
            )
        )
        device = torch.device("cuda:0")
        try:
            model = build_unsloth_classifier(cfg, tokenizer, device)
            optimizer = make_optimizer(model, cfg.train, device)
            model.train()
            for _ in range(3):
                ids = torch.randint(6, len(tokenizer), (2, 64), device=device)
                loss = model(
                    input_ids=ids,
                    attention_mask=torch.ones_like(ids),
                    labels=torch.tensor([0, 2], device=device),
                ).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
            probe = [[2, *torch.randint(6, len(tokenizer), (n,)).tolist()] for n in (10, 40, 25)]
            return {
                "status": "ok",
                **check_unsloth_head_roundtrip(model, tokenizer, Path(tmp) / "merged", probe),
            }
        except UsageError as error:
            return {"status": "failed", "reason": str(error)}


def device_description() -> dict:
    import torch

    from kaggle_utils.core.machine import cpu_name as cpu_model

    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        return {
            "kind": "cuda",
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gb": round(props.total_memory / GB, 1),
            "count": torch.cuda.device_count(),
        }
    import os

    return {
        "kind": "cpu",
        "name": cpu_model(),
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1_5_15min": [round(x, 2) for x in os.getloadavg()],
        "note": "no GPU: the tiny model was measured on CPU; these numbers say nothing about the 9B targets",
    }


def versions() -> dict:
    import bitsandbytes
    import peft
    import torch
    import transformers

    import kaggle_utils

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "bitsandbytes": bitsandbytes.__version__,
        "kaggle_utils": kaggle_utils.__version__,
    }


def print_table(results: list[dict]) -> None:
    header = (
        f"{'ordering':<15}{'model':<22}{'quant':<24}{'step s':>9}{'tokens/s':>11}{'peak CUDA GB':>14}"
        f"{'peak RSS GB':>13}{'trainable':>13}{'target':>9}"
    )
    print(header)
    print("-" * len(header))
    for r in results:
        if "error" in r:
            print(f"{r['ordering']:<15}failed: {r['error']}")
            continue
        cuda = f"{r['peak_cuda_gb']:.2f}" if r["peak_cuda_gb"] is not None else "n/a"
        target = ("ok" if r["meets_target"] else "MISSED") if "meets_target" in r else "n/a"
        print(
            f"{r['ordering']:<15}{r['model'][:21]:<22}{r['quant']:<24}{r['step_time_s']:>9.3f}"
            f"{r['tokens_per_s']:>11.0f}{cuda:>14}{r['peak_rss_gb']:>13.2f}{r['trainable_params']:>13,}"
            f"{target:>9}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3, help="timed optimizer steps per ordering")
    parser.add_argument("--warmup", type=int, default=1, help="untimed first steps")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--orderings", nargs="+", default=list(ORDERINGS), choices=ORDERINGS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument(
        "--out", type=Path, help="JSON path (default: benchmarks/results/bench_train_<kind>.json)"
    )
    args = parser.parse_args()

    if args.worker:
        result = (
            run_unsloth_check()
            if args.worker == "unsloth"
            else run_ordering(args.worker, args.seq_len, args.steps, args.warmup)
        )
        print("RESULT " + json.dumps(result))
        return 0

    import torch

    results = []
    for ordering in args.orderings:
        command = [
            sys.executable,
            __file__,
            "--worker",
            ordering,
            "--steps",
            str(args.steps),
            "--warmup",
            str(args.warmup),
            "--seq-len",
            str(args.seq_len),
        ]
        completed = subprocess.run(command, capture_output=True, text=True)
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        if completed.returncode != 0 or not lines:
            results.append({"ordering": ordering, "error": completed.stderr.strip().splitlines()[-1:]})
        else:
            results.append(json.loads(lines[-1].removeprefix("RESULT ")))
    unsloth_check = None
    if torch.cuda.is_available():
        completed = subprocess.run(
            [sys.executable, __file__, "--worker", "unsloth"], capture_output=True, text=True
        )
        lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
        unsloth_check = (
            json.loads(lines[-1].removeprefix("RESULT "))
            if lines
            else {"status": "crashed", "reason": completed.stderr.strip().splitlines()[-1:]}
        )

    device = device_description()
    print(
        f"device: {device['name']} ({device['kind']})" + (f" - {device['note']}" if "note" in device else "")
    )
    print_table(results)
    if unsloth_check is not None:
        print(f"unsloth head save/reload check: {unsloth_check}")
    payload = {
        "benchmark": "bench_train",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": device,
        "versions": versions(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "results": results,
        "unsloth_head_check": unsloth_check,
    }
    out = args.out or RESULTS_DIR / f"bench_train_{device['kind']}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=2), encoding="utf-8")
    print(f"-> {out}")
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
