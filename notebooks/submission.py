# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Chatbot Arena preference: offline submission
#
# Runs with internet off inside Kaggle's 9 hours and always leaves a valid `submission.csv`: the package
# writes a fallback submission first, predicts with the artifact (either ordering: merged + quantized, or
# 4-bit base + LoRA adapter) on every GPU with swap TTA, drops TTA and then fills rows with the baseline /
# class prior if the time projection overruns, and logs how many rows each path served in
# `submission.inference.json`. All logic lives in `kaggle_utils`; this notebook only sets parameters.
# When any row was served by the fallback (a broken artifact, an unreadable row, the deadline), the last cell
# raises after the file was written and validated, so the run shows as failed, except in Kaggle's hidden
# competition rerun, where the file is the submission and the notebook must finish.

# %%
import glob
import importlib.util
import logging
import os
import subprocess
import sys
import time

NOTEBOOK_STARTED = time.time()  # the deadline counts from here (Kaggle's 9 h include loading)
# Offline: the Hugging Face libraries must not look anything up (bitsandbytes' import asks the Hub for a CPU
# kernel; behind a firewall that drops packets it would hang). Set before any of them is imported.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

# %% tags=["parameters"]
INPUT_ROOT = None  # None: /kaggle/input on Kaggle, else ./data
ARTIFACT_DIR = None  # None: the directory with manifest.json found under INPUT_ROOT
ARTIFACT_HINT = None  # a folder name in the artifact's path when several are attached (whole names; a/b)
TEST_PATH = None  # None: test.csv / test.parquet found under INPUT_ROOT (the one beside sample_submission.csv)
TEST_HINT = None
DIALECT = None  # None: the artifact manifest's competition dialect (lmsys: 3 probability columns; wsdm: id,winner)
FALLBACK = None  # baseline.json (+ its manifest); None: one found inside the artifact / under INPUT_ROOT, else class prior
OUT = None  # None: /kaggle/working/submission.csv on Kaggle, else submissions/submission.csv
TTA = True
LAYOUT = "shared_queue"  # or "view_per_device": original order on GPU0, swapped on GPU1
DEVICE = "auto"
TOKEN_BUDGET = 8192
DEADLINE_HOURS = 9.0
MARGIN_HOURS = 0.75
VERIFY_HASHES = True  # check the artifact's files against their manifest sha256 (~10-15 s for an 8-bit 9B)

# %% [markdown]
# Offline install: when `kaggle_utils` is not importable, install it from the attached datasets made by
# `python -m kaggle_utils kaggle build-wheels` (the package wheel, and the pinned dependency wheels with their
# `requirements.txt`; one dataset or two). Every folder holding wheels is a `--find-links`, and each pinned
# `requirements.txt` is installed too, so the image's older transformers/peft do not satisfy the ranges instead.
# This cell cannot use the package, which it installs.

# %% tags=["offline-install"]
# Offline install, the same in every notebook (edit kaggle_utils/kaggle/install_cell.py, then run
# `python -m kaggle_utils kaggle sync-install-cell`). When kaggle_utils is not importable (a fresh Kaggle
# session, internet off), install it and its pinned wheels from the attached `build-wheels` datasets: every
# folder under /kaggle/input holding wheels is a --find-links, and each one's requirements.txt is installed
# too, so the image's older transformers/peft cannot satisfy the ranges instead. It cannot use the package.
import glob
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("kaggle_utils") is None:
    _wheels = glob.glob("/kaggle/input/**/*.whl", recursive=True)
    if not any(os.path.basename(path).startswith("kaggle_utils-") for path in _wheels):
        raise RuntimeError(
            "kaggle_utils is not installed and no kaggle_utils-*.whl is under /kaggle/input: attach the "
            "datasets made by `python -m kaggle_utils kaggle build-wheels`"
        )
    _command = [sys.executable, "-m", "pip", "install", "--no-index"]
    for _folder in sorted({os.path.dirname(path) for path in _wheels}):
        _command += ["--find-links", _folder]
        if os.path.isfile(os.path.join(_folder, "requirements.txt")):
            _command += ["-r", os.path.join(_folder, "requirements.txt")]
    subprocess.run([*_command, "kaggle_utils"], check=True)
    importlib.invalidate_caches()

# %% [markdown]
# `run_submission` writes a valid file whatever fails: refused settings, two artifacts and no hint, a broken
# artifact all leave a valid file (the fallback: baseline, else class prior) before it raises.

# %%
from kaggle_utils.inference.predictor import run_submission  # noqa: E402 - after the install cell
from kaggle_utils.inference.report import raise_if_fallback  # noqa: E402 - after the install cell

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)
cfg = {  # InferenceConfig's fields, checked inside run_submission (a refused one still leaves a file)
    "tta_swap": TTA,
    "layout": LAYOUT,
    "device": DEVICE,
    "token_budget": TOKEN_BUDGET,
    "deadline_hours": DEADLINE_HOURS,
    "safety_margin_hours": MARGIN_HOURS,
    "verify_hashes": VERIFY_HASHES,
}
report = run_submission(
    INPUT_ROOT,
    artifact_dir=ARTIFACT_DIR,
    test_path=TEST_PATH,
    out_path=OUT,
    cfg=cfg,
    fallback_path=FALLBACK,
    artifact_hint=ARTIFACT_HINT,
    test_hint=TEST_HINT,
    started_at=NOTEBOOK_STARTED,
    fail_on_fallback=False,  # the last cell decides, after the summary is printed
    dialect=DIALECT,
)
print(report.summary())  # starts with "FALLBACK n of N rows" when any row fell back

# %%
print({key: value for key, value in report.timings_s.items()})
print(report.runtime.get("description", ""))

# %%
raise_if_fallback(report)  # the file is written and validated; fail loudly if the model did not serve every row
