"""`python -m kaggle_utils ...`: one argparse front over the stage modules.

Each command group lives in `kaggle_utils/cli/<group>.py` and exposes `register(subparsers)`, which adds its
subcommands with `set_defaults(handler=...)`; a handler returns the exit code and imports its heavy stage
modules itself, so `--help` and the light commands never load torch. A `UsageError` becomes one line on
stderr and exit code 2. Every command runs with the Hugging Face Hub offline and third-party output quieted
(`-v` / `--verbose` brings back INFO logs and their warnings).
"""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext
from pathlib import Path

from kaggle_utils.cli import data, inference, kaggle, modeling, models, study
from kaggle_utils.core.console import configure_logging, log_to_file
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
VERBOSE_HELP = "INFO logs, third-party warnings and progress bars (on a terminal)"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m kaggle_utils", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help=VERBOSE_HELP)
    subparsers = parser.add_subparsers(dest="command", required=True)
    for group in COMMAND_GROUPS:
        COMMAND_MODULES[group].register(subparsers)
    _add_verbose_to_commands(parser)
    return parser


def _add_verbose_to_commands(parser: argparse.ArgumentParser) -> None:
    """`-v` after a command name too (`demo -v`); SUPPRESS keeps a `-v` given before it."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for command in {id(p): p for p in action.choices.values()}.values():
                command.add_argument(
                    "-v", "--verbose", action="store_true", default=argparse.SUPPRESS, help=VERBOSE_HELP
                )
                _add_verbose_to_commands(command)


def main(argv: list[str] | None = None) -> int:
    use_offline_hub()
    args = build_parser().parse_args(argv)
    configure_logging(verbose=args.verbose)
    try:
        run_log = getattr(args, "run_log", None)  # commands whose --out is a run folder keep a log in it
        out = getattr(args, "out", None)
        with log_to_file(Path(out) / run_log, mode="a") if run_log and out else nullcontext():
            return int(args.handler(args) or 0)
    except UsageError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
