"""`python -m kaggle_utils ...`: one argparse front over the stage modules.

Each command group lives in `kaggle_utils/cli/<group>.py` and exposes `register(subparsers)`, which adds
its subcommands with `set_defaults(handler=...)`. A handler returns the exit code. `UsageError`
(kaggle_utils.core.errors: bad input a user can fix) becomes one line on stderr and exit code 2, never a traceback.
Every command runs with the Hugging Face Hub offline (`runtime.use_offline_hub`: nothing here downloads from it;
a variable the user set is kept).
"""

from __future__ import annotations

import argparse
import sys

from kaggle_utils.cli import data, inference, kaggle, modeling, models, study
from kaggle_utils.core.environment import use_offline_hub
from kaggle_utils.core.errors import UsageError

# Imported above (not by name at run time), so the package's import graph is what the source says.
COMMAND_MODULES = {
    "data": data,
    "modeling": modeling,
    "inference": inference,
    "kaggle": kaggle,
    "study": study,
    "models": models,
}
COMMAND_GROUPS: tuple[str, ...] = tuple(COMMAND_MODULES)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kaggle_utils", description=__doc__.splitlines()[0])
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        COMMAND_MODULES[group].register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    use_offline_hub()
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
