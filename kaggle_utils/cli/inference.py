"""Inference commands: predict (artifact + test file -> submission.csv) and find-inputs.

Thin: the package does the work. `predict` imports the inference engine (torch) when it runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys

from kaggle_utils.cli.run_options import add_set_option, config_from_args
from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.inference.inputs import find_inputs as find


def register(subparsers: argparse._SubParsersAction) -> None:
    defaults = InferenceConfig()
    parser = subparsers.add_parser(
        "predict",
        help="offline prediction with an artifact; always writes a valid submission (fallback for rows not "
        "reached)",
    )
    parser.add_argument(
        "--artifact", required=True, help="artifact directory (with manifest.json), either ordering"
    )
    parser.add_argument(
        "--test", required=True, help="competition test file (test.csv, or test.parquet for WSDM)"
    )
    parser.add_argument(
        "--dialect", help="competition dialect (lmsys, wsdm); default: the artifact manifest's"
    )
    parser.add_argument(
        "--out", required=True, help="submission CSV to write (a .inference.json report goes beside)"
    )
    parser.add_argument(
        "--config", help="YAML pipeline config; its `inference` section sets the defaults below"
    )
    parser.add_argument("--no-tta", action="store_true", help="skip the A/B-swapped pass")
    parser.add_argument(
        "--deadline-hours", type=float, help=f"total time limit (default {defaults.deadline_hours})"
    )
    parser.add_argument(
        "--margin-hours", type=float, help=f"kept free (default {defaults.safety_margin_hours})"
    )
    parser.add_argument(
        "--fallback",
        help="baseline model (baseline.json with its .manifest.json) for rows no model pass serves",
    )
    parser.add_argument("--device", choices=("auto", "cuda", "cpu", "tpu"))
    parser.add_argument("--num-gpus", type=int, help="use the first N GPUs (default: all)")
    parser.add_argument("--dtype", choices=("auto", "bfloat16", "float16", "float32"), help="compute dtype")
    parser.add_argument(
        "--token-budget", type=int, help=f"padded tokens per batch (default {defaults.token_budget})"
    )
    parser.add_argument("--layout", choices=("shared_queue", "view_per_device"), help="work layout over GPUs")
    parser.add_argument(
        "--strict", action="store_true", help="exit 1 after writing if any error was absorbed"
    )
    parser.add_argument(
        "--write-fallback-over-previous",
        action="store_true",
        help="when no row came from the model, write the fallback-filled file at --out even over "
        "a valid previous submission (default: keep it, write <stem>.fallback.csv beside)",
    )
    parser.add_argument(
        "--no-verify-hashes",
        action="store_true",
        help="skip checking the artifact's files against their manifest sha256 (~10-15 s for "
        "an 8-bit 9B artifact); only for an artifact you just checked",
    )
    parser.add_argument("--no-progress", action="store_true")
    add_set_option(parser)
    parser.set_defaults(handler=predict)

    parser = subparsers.add_parser(
        "find-inputs", help="show the artifact / test file / wheels found under a root"
    )
    parser.add_argument("root", nargs="?", help="input root (default /kaggle/input, else ./data)")
    parser.add_argument(
        "--artifact-hint", help="a folder name in the wanted artifact's path (whole names; several as a/b)"
    )
    parser.add_argument(
        "--test-hint", help="a folder or file name in the wanted test file's path (whole names)"
    )
    parser.set_defaults(handler=find_inputs)


def inference_config(args: argparse.Namespace) -> InferenceConfig:
    cfg = config_from_args(args).inference
    overrides = {
        "tta_swap": False if args.no_tta else None,
        "deadline_hours": args.deadline_hours,
        "safety_margin_hours": args.margin_hours,
        "device": args.device,
        "num_gpus": args.num_gpus,
        "compute_dtype": args.dtype,
        "token_budget": args.token_budget,
        "layout": args.layout,
        "raise_after_write": True if args.strict else None,
        "progress": False if args.no_progress else None,
        "verify_hashes": False if getattr(args, "no_verify_hashes", False) else None,
    }
    return dataclasses.replace(cfg, **{key: value for key, value in overrides.items() if value is not None})


def predict(args: argparse.Namespace) -> int:
    """Exit 0 when the model served every row; 1 when the fallback served some (the valid file is written,
    except Kaggle's rerun: `report.raise_if_fallback`); 2 for a bad setting or an unwritable output (the
    previous file intact). The keep-the-previous-file rule: `predictor.predict`."""
    from kaggle_utils.inference.predictor import predict as run_predict
    from kaggle_utils.inference.report import InferenceError, raise_if_fallback

    cfg = inference_config(args)
    try:
        report = run_predict(
            args.artifact,
            args.test,
            args.out,
            cfg,
            fallback_path=args.fallback,
            dialect=args.dialect,
            fallback_over_previous=getattr(args, "write_fallback_over_previous", False),
        )
    except InferenceError as error:
        print(f"error (submission written): {error}", file=sys.stderr)
        return 1
    print(report.summary())
    if report.report_written:
        print(f"report: {report.report_path}")
    else:
        print(
            f"warning: the report {report.report_path} could not be written (see the error above)",
            file=sys.stderr,
        )
    try:
        raise_if_fallback(report)
    except InferenceError as error:  # the summary inside names the first error
        kept = "previous submission kept" if report.previous_kept else "submission written"
        print(f"error ({kept}): {' '.join(str(error).split())}", file=sys.stderr)
        return 1
    return 0


def find_inputs(args: argparse.Namespace) -> int:
    print(find(args.root, artifact_hint=args.artifact_hint, test_hint=args.test_hint).describe())
    return 0
