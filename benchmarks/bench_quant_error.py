"""What quantization does to REAL vs RANDOM weights: per-layer weight error and the error of the scored
vector.

The project's random-weight test models show quantization-induced degradation (QiD) near zero because random
(Gaussian) weights have no outliers. This benchmark measures, on a real checkpoint (by default Gemma 3 270M,
converted from a Q4_K_M GGUF, so its weights already carry Q4_K_M rounding) and on a random-init model of
the SAME config (built by `kaggle_utils.models.classifier.build_classifier` from its config.json, seed 0), for
each shipped scheme -- bitsandbytes NF4 (double quant, block 64), bitsandbytes LLM.int8 (threshold 6.0), the
package's group-wise INT4 (RTN and HQQ, group 64) -- over every q/k/v/o/gate/up/down projection:

1. weight statistics: excess kurtosis and outlier ratio max|w| / std;
2. relative weight error ||W - dequant(quant(W))||_F / ||W||_F (median, max, worst layers). For int8 this is
   the weight-only error of bitsandbytes' row-wise absmax int8 storage (`int8_vectorwise_quant`); the LLM.int8
   outlier threshold acts on activations at matmul time, so it is in (3), not here;
3. end to end: relative error ||h_q - h|| / ||h|| of the last hidden state at the last token (the vector the
   3-class score head reads), mean / max over generated conversation rows formatted by
   `kaggle_utils.text.encode` with the model's own tokenizer. The reference h is the fp32 model (bf16 weights
   are exact in fp32); the quantized model swaps each projection for bitsandbytes `Linear4bit` /
   `Linear8bitLt` (eval mode: LLM.int8's mixed int8 matmul, fp16-cast activations) or the package's
   `Int4Linear`, on CPU; "int8_weight_only" runs the dequantized int8 weight in fp32, to tell weight rounding
   from activation rounding.

Run: `.venv/bin/python benchmarks/bench_quant_error.py` (1 thread, about 6 minutes; writes
benchmarks/results/quant_error/bench_quant_error.json and a .md table, with device, date and command).
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from kaggle_utils.core.config import FormatConfig, ModelConfig
from kaggle_utils.core.machine import cpu_name as cpu_model
from kaggle_utils.data.load import load_competition
from kaggle_utils.data.sample import generate_competition_files
from kaggle_utils.models.classifier import build_classifier
from kaggle_utils.quant.int4 import (
    Int4Linear,
    Int4Weight,
    iter_target_linears,
    quantize_hqq,
    quantize_rtn,
    replace_module,
)
from kaggle_utils.text.encode import encode_rows
from kaggle_utils.text.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
RESULTS = Path(__file__).resolve().parent / "results" / "quant_error" / "bench_quant_error.json"
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SCHEMES = ("nf4", "int8", "int4_rtn", "int4_hqq")
# End to end only: the int8 storage error alone (fp32 matmul with the dequantized int8 weight), which
# separates LLM.int8's weight rounding from its activation quantization (fp16 cast, int8 rows, outlier
# columns in 16-bit).
INT8_WEIGHT_ONLY = "int8_weight_only"
INT8_THRESHOLD = 6.0  # transformers' BitsAndBytesConfig default (llm_int8_threshold), which the package ships


def default_model_dir() -> Path | None:
    found = sorted((ROOT / ".cache" / "models").glob("gemma-3-270m-*"))
    return found[0] if found else None


def relative_error(approx: torch.Tensor, exact: torch.Tensor) -> float:
    return float((approx.float() - exact.float()).norm() / exact.float().norm())


def weight_stats(weight: torch.Tensor) -> dict[str, float]:
    """Excess kurtosis (0 for a Gaussian) and max|w| / std: how much outlier structure a layer has."""
    w = weight.double().flatten()
    centred = w - w.mean()
    std = centred.pow(2).mean().sqrt()
    return {
        "excess_kurtosis": float(centred.pow(4).mean() / std.pow(4) - 3.0),
        "outlier_ratio": float(w.abs().max() / std),
    }


def dequantized(weight: torch.Tensor, scheme: str, group_size: int) -> tuple[torch.Tensor, Int4Weight | None]:
    """dequant(quant(W)) for `scheme`, as the shipped backends store W.

    Also returns the INT4 codes (None for other schemes), reused end to end.
    """
    import bitsandbytes.functional as bnb_functional

    if scheme == "nf4":  # BitsAndBytesConfig(nf4, double quant): blocksize 64, absmax itself 8-bit quantized
        packed, state = bnb_functional.quantize_4bit(
            weight, blocksize=64, quant_type="nf4", compress_statistics=True
        )
        return bnb_functional.dequantize_4bit(packed, state), None
    if scheme == "int8":  # Linear8bitLt stores the whole weight as row-wise absmax int8 (from fp16)
        codes, row_stats, _ = bnb_functional.int8_vectorwise_quant(weight.to(torch.float16))
        return bnb_functional.int8_vectorwise_dequant(codes, row_stats), None
    quantized = quantize_rtn(weight, group_size) if scheme == "int4_rtn" else quantize_hqq(weight, group_size)
    return quantized.dequantize(), quantized


def quantized_module(linear: nn.Linear, scheme: str, int4: Int4Weight | None) -> nn.Module:
    """The module a quantized model runs in place of `linear` (eval mode, CPU)."""
    import bitsandbytes as bnb

    weight = linear.weight.data.detach().clone()
    if scheme == INT8_WEIGHT_ONLY:
        codes, row_stats, _ = bnb.functional.int8_vectorwise_quant(weight.to(torch.float16))
        module = nn.Linear(linear.in_features, linear.out_features, bias=False)
        module.weight.data = bnb.functional.int8_vectorwise_dequant(codes, row_stats).to(weight.dtype)
        return module.eval()
    if scheme == "nf4":
        module = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=False,
            compute_dtype=weight.dtype,
            quant_type="nf4",
            compress_statistics=True,
        )
        module.weight = bnb.nn.Params4bit(
            weight, requires_grad=False, quant_type="nf4", compress_statistics=True, blocksize=64
        )
    elif scheme == "int8":
        module = bnb.nn.Linear8bitLt(
            linear.in_features,
            linear.out_features,
            bias=False,
            has_fp16_weights=False,
            threshold=INT8_THRESHOLD,
        )
        module.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        return Int4Linear.from_weight(int4).eval()
    return module.to("cpu").eval()


def summarise(values: dict[str, float], worst: int = 3) -> dict:
    ordered = sorted(values.items(), key=lambda kv: kv[1], reverse=True)
    array = np.array(list(values.values()))
    return {
        "median": float(np.median(array)),
        "mean": float(array.mean()),
        "max": float(array.max()),
        "worst": [{"layer": name, "value": value} for name, value in ordered[:worst]],
    }


@torch.no_grad()
def scored_vectors(model: nn.Module, rows: list[list[int]]) -> torch.Tensor:
    """Last-token final hidden state per row (unpadded, one row at a time): what the score head reads."""
    backbone = model.base_model
    out = []
    for ids in rows:
        hidden = backbone(input_ids=torch.tensor([ids])).last_hidden_state
        out.append(hidden[0, -1].float())
    return torch.stack(out)


def measure_model(model: nn.Module, rows: list[list[int]], group_size: int, max_layers: int | None) -> dict:
    model.eval()
    linears = iter_target_linears(model, TARGETS)
    if max_layers is not None:
        linears = linears[:max_layers]
    stats, errors, seconds = {}, {s: {} for s in SCHEMES}, dict.fromkeys(SCHEMES, 0.0)
    int4: dict[tuple[str, str], Int4Weight | None] = {}
    for name, linear in linears:
        weight = linear.weight.data.float()
        stats[name] = weight_stats(weight) | {"shape": list(weight.shape)}
        for scheme in SCHEMES:
            began = time.perf_counter()
            approx, int4[scheme, name] = dequantized(weight, scheme, group_size)
            errors[scheme][name] = relative_error(approx, weight)
            seconds[scheme] += time.perf_counter() - began
    began = time.perf_counter()
    reference = scored_vectors(model, rows)
    forward_s = time.perf_counter() - began
    end_to_end = {}
    for scheme in (*SCHEMES, INT8_WEIGHT_ONLY):
        originals = dict(linears)
        for name, linear in linears:
            replace_module(model, name, quantized_module(linear, scheme, int4.get((scheme, name))))
        per_row = [relative_error(q, r) for q, r in zip(scored_vectors(model, rows), reference, strict=True)]
        for name, linear in originals.items():
            replace_module(model, name, linear)
        end_to_end[scheme] = {
            "mean": float(np.mean(per_row)),
            "max": float(np.max(per_row)),
            "per_row": per_row,
        }
    kurt = {n: s["excess_kurtosis"] for n, s in stats.items()}
    ratio = {n: s["outlier_ratio"] for n, s in stats.items()}
    return {
        "layers_measured": len(linears),
        "weight_stats_summary": {"excess_kurtosis": summarise(kurt), "outlier_ratio": summarise(ratio)},
        "relative_weight_error_summary": {s: summarise(errors[s]) for s in SCHEMES},
        "hidden_state_relative_error": end_to_end,
        "reference_hidden_norm_mean": float(reference.norm(dim=1).mean()),
        "quantize_seconds": seconds,
        "reference_forward_seconds": forward_s,
        "per_layer": {n: stats[n] | {f"rel_err_{s}": errors[s][n] for s in SCHEMES} for n in stats},
    }


def markdown(result: dict) -> str:
    lines = [
        f"# Quantization error: real vs random weights ({result['model']['name']})",
        "",
        f"Date {result['date']}; command `{result['command']}`; {result['device']['cpu_model']}, "
        f"{result['device']['torch_threads']} torch thread(s). {result['model']['note']}",
        "",
        f"{result['rows']} generated rows (max_length {result['params']['max_length']}, lengths "
        f"{result['row_lengths']}); {result['models']['real']['layers_measured']} "
        "projection layers per model.",
        "",
        "| weights | kurtosis (median) | max\\|w\\|/std (median / max) | scheme | weight rel. err "
        "median | max (worst layer) | hidden rel. err mean | max |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for kind, data in result["models"].items():
        ws = data["weight_stats_summary"]
        for scheme in SCHEMES:
            we = data["relative_weight_error_summary"][scheme]
            he = data["hidden_state_relative_error"][scheme]
            lines.append(
                f"| {kind} | {ws['excess_kurtosis']['median']:.2f} | {ws['outlier_ratio']['median']:.1f} / "
                f"{ws['outlier_ratio']['max']:.1f} | {scheme} | {we['median']:.4f} | {we['max']:.4f} "
                f"({we['worst'][0]['layer']}) | {he['mean']:.4f} | {he['max']:.4f} |"
            )
        he = data["hidden_state_relative_error"][INT8_WEIGHT_ONLY]
        lines.append(
            f"| {kind} | | | int8 weight only (fp32 matmul) | | | {he['mean']:.4f} | {he['max']:.4f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--model-dir",
        type=Path,
        default=None,
        help="checkpoint dir with config.json, weights and tokenizer (default: cached Gemma 3 270M)",
    )
    parser.add_argument("--rows", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument(
        "--max-layers", type=int, default=None, help="subsample: first N projection layers only"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--note",
        default="Weights converted from a Q4_K_M GGUF: they already carry Q4_K_M "
        "rounding, so they are not the original bf16 release.",
    )
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    model_dir = args.model_dir or default_model_dir()
    if model_dir is None or not (model_dir / "config.json").is_file():
        parser.error(f"no checkpoint directory with config.json at {model_dir} (pass --model-dir)")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    # LLM.int8 casts fp32 activations to fp16 to quantize them (said in the docstring); once, not per layer.
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

    tokenizer = load_tokenizer(model_dir)
    with tempfile.TemporaryDirectory(
        prefix="quant-error-"
    ) as tmp:  # the pipeline's path: CSV -> loaded frame
        files = generate_competition_files(tmp, n_train=args.rows, n_test=1, seed=args.seed, traps=False)
        frame = load_competition(files.train_csv, split="train").frame
    encoded = encode_rows(frame, tokenizer, FormatConfig(template="auto", max_length=args.max_length))
    rows = encoded.input_ids
    load_before = os.getloadavg()[0]
    began = time.perf_counter()
    models = {}
    for kind in ("real", "random"):
        source = model_dir if kind == "real" else model_dir / "config.json"
        model = build_classifier(
            ModelConfig(base_model=str(source), dtype="float32", init_seed=args.seed),
            vocab_size=len(tokenizer),
            pad_token_id=tokenizer.pad_token_id,
            device="cpu",
        )
        models[kind] = measure_model(model, rows, args.group_size, args.max_layers)
        del model
    total_s = time.perf_counter() - began
    result = {
        "benchmark": "bench_quant_error",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "command": shlex.join([Path(sys.executable).name, *sys.argv]),
        "device": {
            "cpu_model": cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": {
            name: importlib.metadata.version(name)
            for name in ("torch", "transformers", "bitsandbytes", "hqq")
        }
        | {"python": platform.python_version()},
        "params": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "model": {
            "name": model_dir.name,
            "note": args.note,
            "random": "same config.json, random init by build_classifier (transformers' init, seed "
            f"{args.seed})",
            "reference_dtype": "float32",
        },
        "schemes": {
            "nf4": "bitsandbytes NF4, blocksize 64, double quant",
            "int8": "bitsandbytes LLM.int8, "
            f"threshold {INT8_THRESHOLD}; weight error = row-wise absmax int8 storage only",
            INT8_WEIGHT_ONLY: "end to end only: fp32 matmul with the dequantized int8 weight (no "
            "activation quantization)",
            "int4_rtn": f"kaggle_utils INT4 RTN min-max, group {args.group_size}",
            "int4_hqq": f"kaggle_utils INT4 HQQ, group {args.group_size}",
        },
        "rows": len(rows),
        "row_lengths": {"mean": float(encoded.lengths.mean()), "max": int(encoded.lengths.max())},
        "total_seconds": total_s,
        "models": models,
    }
    print(markdown(result))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    args.out.with_suffix(".md").write_text(markdown(result), encoding="utf-8")
    print(f"wrote {args.out} and {args.out.with_suffix('.md').name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
