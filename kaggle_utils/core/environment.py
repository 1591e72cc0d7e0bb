"""Where this process runs (a Kaggle kernel or not, the scoring rerun), its default input and output
folders, and the Hugging Face libraries kept offline. No torch: the CLI calls `use_offline_hub()` first."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from kaggle_utils.core.errors import UsageError

KAGGLE_INPUT = Path("/kaggle/input")

KAGGLE_WORKING = Path("/kaggle/working")


def on_kaggle() -> bool:
    """Inside a Kaggle kernel (interactive, commit or the competition rerun)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_WORKING.is_dir()


def is_competition_rerun() -> bool:
    """Kaggle sets KAGGLE_IS_COMPETITION_RERUN in the scoring rerun (the hidden ~25k-row test set)."""
    return bool(os.environ.get("KAGGLE_IS_COMPETITION_RERUN"))


# The Hugging Face libraries' offline switches. bitsandbytes' CPU backend asks the Hub for a kernel on every
# import (CPUs with AVX512-BF16), and transformers / datasets may look up a name there: the package never
# downloads from the Hub (every load is `local_files_only`), so it runs with these set.
OFFLINE_ENV: dict[str, str] = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def use_offline_hub() -> list[str]:
    """Set each variable of `OFFLINE_ENV` the user has not set (a user's own value is kept); returns the
    names set. Called at CLI start, by `predict` and `run_submission`."""
    user_set = {name for name in OFFLINE_ENV if name in os.environ}
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: when already imported, switch its constant too.
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and "HF_HUB_OFFLINE" not in user_set and "TRANSFORMERS_OFFLINE" not in user_set:
        hub.HF_HUB_OFFLINE = True
    return [name for name in OFFLINE_ENV if name not in user_set]


def default_input_root() -> Path:
    return KAGGLE_INPUT if KAGGLE_INPUT.is_dir() else Path("data")


def run_output_dir(name: str, out_dir: str | Path | None = None) -> Path:
    """`out_dir` when given, else /kaggle/working/<name> on Kaggle (kept as the kernel's output), else
    runs/<name>."""
    if out_dir:
        return Path(out_dir)
    return (KAGGLE_WORKING if on_kaggle() else Path("runs")) / name


def find_competition_file(competition: str, name: str = "train.csv", local_dir: str | Path = "data") -> Path:
    """A competition's file: /kaggle/input/<slug>/<name> or /kaggle/input/competitions/<slug>/<name> (Kaggle
    images mount competitions either way), else <local_dir>/<name> outside Kaggle. A missing file is a
    UsageError listing the places looked at."""
    candidates = [
        KAGGLE_INPUT / competition / name,
        KAGGLE_INPUT / "competitions" / competition / name,
        Path(local_dir) / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise UsageError(f"no {name} in {[str(path) for path in candidates]}")


def default_submission_path() -> Path:
    """/kaggle/working/submission.csv on Kaggle (where it is scored), else submissions/submission.csv."""
    return KAGGLE_WORKING / "submission.csv" if on_kaggle() else Path("submissions") / "submission.csv"
