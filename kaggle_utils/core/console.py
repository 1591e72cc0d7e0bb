"""Where output goes: progress bars that draw only on a terminal, the log's handlers, quiet third parties.

Usage: `for row in progress_bar(rows, desc="rows", enabled=cfg.progress): ...` (tqdm's arguments);
`configure_logging(verbose)` once at program start (the CLI does); `with log_to_file(path): ...` around a run
whose log is kept; `say(line, logger)` for a line printed on stdout and kept in that log.
"""

from __future__ import annotations

import logging
import os
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

PROGRESS_ENV = "KAGGLE_UTILS_PROGRESS"
# The log a run keeps in its output folder (train, compare-orderings, qid-study; appended on resume).
RUN_LOG = "run.log"
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
FILE_LOG_FORMAT = "%(asctime)s " + LOG_FORMAT
CONSOLE_HANDLER = "kaggle_utils.console"
# `say` marks its records so the console handler skips them: the line is already on stdout.
ECHOED = "kaggle_utils_echoed"
# Loggers of libraries whose warnings are noise for this package's runs (bitsandbytes' optional CPU kernel
# from the Hub, the kernels package's trust check, PEFT / accelerate advice); ERROR and up still show.
QUIET_LOGGERS = ("bitsandbytes", "kernels", "peft", "accelerate", "huggingface_hub", "torch.distributed")
QUIET_WARNING_MODULES = r"(transformers|peft|bitsandbytes|accelerate|huggingface_hub|torch)(\.|$)"
# Read by huggingface_hub / transformers when they are imported (a value the user set is kept).
QUIET_ENV = {
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
}


def progress_wanted() -> bool:
    """True when bars should draw: forced by `KAGGLE_UTILS_PROGRESS`, else when stderr is a terminal."""
    setting = os.environ.get(PROGRESS_ENV, "").strip()
    if setting in {"0", "1"}:
        return setting == "1"
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar drawn only when `enabled` and `progress_wanted()`; otherwise a silent pass-through."""
    return tqdm(iterable, disable=not (enabled and progress_wanted()), **kwargs)


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record comes (pytest and notebooks swap it)."""

    def __init__(self, level: int) -> None:
        super().__init__(sys.stderr)
        self.setLevel(level)

    @property
    def stream(self) -> Any:  # type: ignore[override]
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _not_echoed(record: logging.LogRecord) -> bool:
    return not getattr(record, ECHOED, False)


def configure_logging(verbose: bool = False) -> None:
    """Log records to stderr: INFO and up with `verbose`, else WARNING and up; third-party libraries quieted
    unless `verbose` (`quiet_third_party`). Calling it again replaces the earlier setting."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if h.get_name() == CONSOLE_HANDLER]:
        root.removeHandler(handler)
    handler = _StderrHandler(logging.INFO if verbose else logging.WARNING)
    handler.set_name(CONSOLE_HANDLER)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    handler.addFilter(_not_echoed)
    root.addHandler(handler)
    root.setLevel(
        logging.INFO
    )  # a log file (`log_to_file`) keeps INFO records; the handler filters the console
    quiet_third_party(verbose)


def quiet_third_party(verbose: bool = False) -> None:
    """Silence third-party warnings, advice and progress bars (`verbose`: keep them, bars only on a terminal).

    Safe before or after the libraries are imported: sets the variables they read at import, their loggers'
    levels and warnings filters, and switches already imported ones directly. Never touches the network."""
    bars = verbose and progress_wanted()
    if not verbose:
        for name, value in QUIET_ENV.items():
            os.environ.setdefault(name, value)
        for name in QUIET_LOGGERS:
            logging.getLogger(name).setLevel(logging.ERROR)
        for category in (FutureWarning, UserWarning, DeprecationWarning):
            warnings.filterwarnings("ignore", category=category, module=QUIET_WARNING_MODULES)
    elif not bars:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hub = sys.modules.get("huggingface_hub.utils")
    if hub is not None:
        (hub.enable_progress_bars if bars else hub.disable_progress_bars)()
    transformers_logging = sys.modules.get("transformers.utils.logging")
    if transformers_logging is not None:
        (transformers_logging.enable_progress_bar if bars else transformers_logging.disable_progress_bar)()
        if not verbose:
            transformers_logging.set_verbosity_error()


@contextmanager
def log_to_file(path: str | Path, mode: str = "w") -> Iterator[Path]:
    """Copy INFO-and-up records (and `say`'s lines) to `path` while the block runs; `mode="a"` appends
    (a resumed run keeps its earlier log), `"w"` replaces."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    handler = logging.FileHandler(path, mode=mode, encoding="utf-8")
    handler.setLevel(logging.INFO)
    handler.setFormatter(logging.Formatter(FILE_LOG_FORMAT))
    # Without a console handler (a library call, not the CLI) warnings would reach only the file.
    console = None
    if not any(h.get_name() == CONSOLE_HANDLER for h in root.handlers):
        console = _StderrHandler(logging.WARNING)
        console.addFilter(_not_echoed)
        root.addHandler(console)
    previous_level = root.level
    if root.getEffectiveLevel() > logging.INFO:
        root.setLevel(logging.INFO)
    root.addHandler(handler)
    try:
        yield path
    finally:
        root.removeHandler(handler)
        handler.close()
        if console is not None:
            root.removeHandler(console)
        root.setLevel(previous_level)


def say(message: str, logger: logging.Logger, echo: Callable[[str], None] = print) -> None:
    """`echo(message)` (stdout by default) and an INFO record of it for the log file, kept off the console."""
    echo(message)
    logger.info(message, extra={ECHOED: True})
