"""Group-wise INT4 (kaggle_utils.quant.int4): quantizer error, zero-point fold precision by storage dtype,
speed.

Three measurements on Gemma-2-9B-shaped layers (hidden 3584, intermediate 14336; random Gaussian weights, so
the errors are those of a Gaussian, not of trained weights):
1. relative weight MSE of RTN min-max vs HQQ at group 64 (and bitsandbytes NF4 for reference);
2. the zero-point fold W + d = s (q - (z - d / s)): max |merged - (W_deq + d)| when the folded zero point is
   stored in float32 / float16 / bfloat16, against half a quantization step (the rounding error itself) --
   the evidence for storing zero points in float32;
3. dequantize + matmul time on this CPU for a (rows x 3584) @ 3584x14336 layer, INT4 vs the 16-bit matmul.
Run: `.venv/bin/python benchmarks/bench_qaware_int4.py` (about 4 minutes on 2 shared cores, mostly HQQ).
Writes benchmarks/results/bench_qaware_int4.json with device, date and versions.
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.metadata
import json
import os
import platform
import time
from pathlib import Path

import torch

from kaggle_utils.core.machine import cpu_name as cpu_model
from kaggle_utils.quant.int4 import Int4Linear, dequantize, quantize_hqq, quantize_rtn

RESULTS = Path(__file__).resolve().parent / "results" / "bench_qaware_int4.json"


def relative_mse(approx: torch.Tensor, weight: torch.Tensor) -> float:
    return float((approx - weight).pow(2).mean() / weight.pow(2).mean())


def quantizer_errors(weight: torch.Tensor, group_size: int) -> dict[str, float]:
    import bitsandbytes.functional as bnb_functional

    packed, state = bnb_functional.quantize_4bit(
        weight, blocksize=64, quant_type="nf4", compress_statistics=False
    )
    return {
        "rtn": relative_mse(quantize_rtn(weight, group_size).dequantize(), weight),
        "hqq": relative_mse(quantize_hqq(weight, group_size).dequantize(), weight),
        "nf4_blocksize64": relative_mse(bnb_functional.dequantize_4bit(packed, state), weight),
    }


def fold_precision(weight: torch.Tensor, group_size: int, seed: int) -> dict[str, float]:
    """Largest weight error of the folded model per zero-point storage dtype, in units of the half step."""
    quantized = quantize_hqq(weight, group_size)
    out_features, in_features = weight.shape
    groups = in_features // group_size
    generator = torch.Generator().manual_seed(seed)
    # A trained adapter's per-group update: a fraction of a quantization step either way.
    update = quantized.scale.float() * 0.3 * torch.randn(out_features, groups, generator=generator)
    exact = quantized.dequantize(torch.float64) + update.double().repeat_interleave(group_size, dim=1)
    half_step = float(quantized.scale.float().max()) / 2
    results = {}
    for name, dtype in (("float32", torch.float32), ("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        zero = (quantized.zero.double() - update.double() / quantized.scale.double()).to(dtype)
        merged = dequantize(quantized.codes, quantized.scale, zero, group_size, torch.float64)
        error = (merged - exact).abs()
        results[f"{name}_max_abs"] = float(error.max())
        results[f"{name}_max_in_half_steps"] = float(error.max()) / half_step
        results[f"{name}_mean_in_half_steps"] = float(error.mean()) / half_step
    return results


def matmul_timing(
    in_features: int, out_features: int, rows: int, group_size: int, repeats: int
) -> dict[str, float]:
    linear = torch.nn.Linear(in_features, out_features, bias=False)
    int4 = Int4Linear.from_linear(linear, group_size, method="rtn")
    x = torch.randn(rows, in_features)

    def best_of(fn) -> float:
        times = []
        for _ in range(repeats):
            began = time.perf_counter()
            with torch.no_grad():
                fn(x)
            times.append(time.perf_counter() - began)
        return min(times)

    return {
        "fp32_matmul_s": best_of(linear),
        "int4_dequant_matmul_s": best_of(int4),
        "int4_dequant_only_s": best_of(lambda _: int4.dequantized_weight()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--rows", type=int, default=256, help="activation rows for the timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    shapes = {"q_proj 4096x3584": (4096, 3584), "down_proj 3584x14336": (3584, 14336)}
    load_before = os.getloadavg()[0]
    errors, folds = {}, {}
    for name, shape in shapes.items():
        weight = torch.randn(*shape) * 0.02
        errors[name] = quantizer_errors(weight, args.group_size)
        folds[name] = fold_precision(weight, args.group_size, args.seed)
    timing = matmul_timing(3584, 14336, args.rows, args.group_size, args.repeats)
    result = {
        "benchmark": "bench_qaware_int4",
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "device": {
            "cpu_model": cpu_model(),
            "cores": len(os.sched_getaffinity(0)),
            "platform": platform.platform(),
            "torch_threads": torch.get_num_threads(),
        },
        "load_average_1m_before_after": [round(load_before, 2), round(os.getloadavg()[0], 2)],
        "versions": {name: importlib.metadata.version(name) for name in ("torch", "hqq", "bitsandbytes")}
        | {"python": platform.python_version()},
        "params": vars(args) | {"out": str(args.out)},
        "relative_weight_mse": errors,
        "fold_error_by_zero_dtype": folds,
        "timing_3584x14336": timing,
    }
    print(f"relative weight MSE (group {args.group_size})")
    print(f"{'layer':<24}{'rtn':>10}{'hqq':>10}{'nf4':>10}")
    for name, values in errors.items():
        print(f"{name:<24}{values['rtn']:>10.5f}{values['hqq']:>10.5f}{values['nf4_blocksize64']:>10.5f}")
    print("\nfolded zero point: max |merged - (W_deq + delta)| in half quantization steps")
    print(f"{'layer':<24}{'float32':>12}{'float16':>12}{'bfloat16':>12}")
    for name, values in folds.items():
        print(
            f"{name:<24}"
            + "".join(
                f"{values[f'{d}_max_in_half_steps']:>12.2e}" for d in ("float32", "float16", "bfloat16")
            )
        )
    print(
        f"\n{args.rows}x3584 @ 3584x14336 on CPU: fp32 {timing['fp32_matmul_s'] * 1e3:.1f} ms, "
        f"int4 dequant+matmul {timing['int4_dequant_matmul_s'] * 1e3:.1f} ms "
        f"(dequant alone {timing['int4_dequant_only_s'] * 1e3:.1f} ms)"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2), encoding="utf-8")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
