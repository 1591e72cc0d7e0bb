"""Where the package's own output goes: progress bars that draw only on a terminal.

Call `progress_bar(...)` wherever a loop wants a bar; it takes tqdm's arguments and returns a tqdm object.
`enabled=False` (a command's own switch, e.g. `InferenceConfig.progress`) turns it off; so does a standard
error that is not a terminal (CI, a log file), and `KAGGLE_UTILS_PROGRESS=0`. `KAGGLE_UTILS_PROGRESS=1`
forces bars on.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

PROGRESS_ENV = "KAGGLE_UTILS_PROGRESS"


def progress_wanted() -> bool:
    """True when bars should draw: forced by `KAGGLE_UTILS_PROGRESS`, else when standard error is a terminal."""
    setting = os.environ.get(PROGRESS_ENV, "").strip()
    if setting in {"0", "1"}:
        return setting == "1"
    stream = sys.stderr
    return bool(getattr(stream, "isatty", None) and stream.isatty())


def progress_bar(iterable: Iterable | None = None, *, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar that is drawn only when `enabled` and `progress_wanted()`; otherwise a silent pass-through."""
    return tqdm(iterable, disable=not (enabled and progress_wanted()), **kwargs)
