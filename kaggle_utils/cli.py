"""`python -m kaggle_utils ...`: one argparse front over the stage modules.

Each command group lives in `kaggle_utils/commands/<group>.py` and exposes `register(subparsers)`, which adds
its subcommands with `set_defaults(handler=...)`. A handler returns the exit code. `UsageError`
(kaggle_utils.errors: bad input a user can fix) becomes one line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kaggle_utils.errors import UsageError

COMMAND_GROUPS: tuple[str, ...] = (
    "data",
    "modeling",
    "inference",
    "kaggle",
    "study",
    "models",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kaggle_utils", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        module = importlib.import_module(f"kaggle_utils.commands.{group}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
