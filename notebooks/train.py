# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.7
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Train one ordering: quantize → fine-tune, or fine-tune → quantize
#
# `ORDERING` picks the ordering (a misspelt value stops the first package cell):
#
# - `"quant-then-ft"`: QLoRA. The base is loaded in 4-bit NF4 (double quantisation) and the LoRA adapter is
#   trained on the quantized weights, so training sees the rounding it will ship with; the artifact is the 4-bit
#   base plus the unmerged adapter (the public 0.941 notebook and 3rd place).
# - `"ft-then-quant"`: LoRA on the 16-bit base, merge, then quantize the merged model with bitsandbytes (NF4 or
#   int8, `quant.scheme`): the weights are trained in full precision and rounded once at the end (1st place
#   quantized after training).
#
# One ordering per run (a Kaggle session has 12 hours and one pair of GPUs): this notebook is pushed as two
# kernels, `kaggle push notebooks/train.ipynb -p ORDERING=quant-then-ft` (arena-train-quant-then-ft) and
# `-p ORDERING=ft-then-quant` (arena-train-ft-then-quant); `cv_report` joins both.
# All logic is in `kaggle_utils.studies.orderings`: `resolve_training_notebook` turns the parameters into a config and
# paths, `compare_orderings` trains the folds, ships the artifact (reloaded from disk and scored as inference
# scores it) and writes `report.json`, `report.md`, `report.png` and `oof.parquet` under `OUT_DIR`. Folds are
# grouped by prompt and made deterministically from `train.csv`, so both runs train on identical folds
# (the report records the folds file's sha256; `cv_report` checks it).

# %%
import os

# Offline: the Hugging Face libraries must not look anything up (bitsandbytes' import asks the Hub for a CPU
# kernel; behind a firewall that drops packets it would hang). Set before any of them is imported.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

# %% tags=["parameters"]
ORDERING = "quant-then-ft"  # or "ft-then-quant"; `kaggle push` sets it per kernel (-p ORDERING=...)
COMPETITION = "llm-classification-finetuning"
TRAIN_PATH = None  # None: COMPETITION's train.csv under /kaggle/input (either mount layout), else data/train.csv
OUT_DIR = None  # None: /kaggle/working/<ORDERING> on Kaggle, else runs/<ORDERING>
CONFIG_PATH = None  # a YAML PipelineConfig; None: the defaults (the winners' settings, config.py)
BASE_MODEL_PATH = None  # local checkpoint dir (e.g. an attached Gemma-2 9B); None: the config's base_model
TOKENIZER_PATH = None  # its tokenizer; None: the config's (a locally trained demo tokenizer when unset)
FOLDS_PATH = None  # a shared folds parquet; None: made here from train.csv with the config's seed
CV_FOLDS = [0]  # folds to train (each trains on the others and is scored on itself)
SEEDS = [42]
OVERRIDES = {}  # per-section config changes, e.g. {"train": {"max_steps": 100}, "format": {"max_length": 1024}}

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

# %%
import logging

from IPython.display import Image, Markdown, display

from kaggle_utils.evaluate.report_render import artifact_table, plot_learning_curves
from kaggle_utils.studies.experiment import resolve_training_notebook
from kaggle_utils.studies.orderings import OOF_FILE, REPORT_MD, REPORT_PNG, compare_orderings

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)

cfg, train_path, out_dir = resolve_training_notebook(
    ORDERING, COMPETITION, train_path=TRAIN_PATH, out_dir=OUT_DIR, config_path=CONFIG_PATH,
    base_model_path=BASE_MODEL_PATH, tokenizer_path=TOKENIZER_PATH, cv_folds=CV_FOLDS, overrides=OVERRIDES,
)
print(f"ordering {ORDERING}: {train_path} -> {out_dir}; base {cfg.model.base_model}; folds {CV_FOLDS}; seeds {SEEDS}")

# %%
report = compare_orderings(cfg, train_path, out_dir, folds_path=FOLDS_PATH, seeds=SEEDS, variants=[ORDERING])

# %% [markdown]
# ## Result
# Held-out log loss of the 16-bit model and of the shipped (quantized) artifact, QiD, time, memory and size.

# %%
display(Markdown((out_dir / REPORT_MD).read_text()))
display(Image(filename=str(out_dir / REPORT_PNG)))

# %% [markdown]
# ## Learning curves: held-out log loss during training, per fold

# %%
curves = plot_learning_curves(report, out_dir / "learning_curves.png")  # kept with the report
display(Image(filename=str(curves)))

# %% [markdown]
# ## The artifact to ship
# Upload it as the submission kernel's artifact dataset:
# `python -m kaggle_utils kaggle upload-artifact <artifact_dir> -m "<notes>"`.

# %%
display(artifact_table(report))
print(f"OOF predictions: {out_dir / OOF_FILE}")
