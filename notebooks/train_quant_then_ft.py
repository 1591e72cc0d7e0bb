# ---
# jupyter:
#   jupytext:
#     cell_metadata_filter: tags,-all
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#       format_version: '1.3'
#       jupytext_version: 1.19.6
#   kernelspec:
#     display_name: Python 3 (ipykernel)
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Train: quantize → fine-tune
#
# QLoRA: the base is loaded in 4-bit NF4 (double quantisation) and the LoRA adapter is trained on the
# quantized weights, so training sees the rounding it will ship with; the artifact is the 4-bit base plus the
# unmerged adapter (the public 0.941 notebook and 3rd place).
#
# One ordering per notebook (a Kaggle session has 12 hours and one pair of GPUs); `cv_report` joins both.
# All logic is in `kaggle_utils.compare.compare_orderings`, which trains the folds, ships the artifact
# (reloaded from disk and scored as inference scores it) and writes `report.json`, `report.md`, `report.png`
# and `oof.parquet` under `OUT_DIR`. Folds are grouped by prompt and made deterministically from `train.csv`,
# so both notebooks train on identical folds (the report records the folds file's sha256; `cv_report` checks
# it).

# %% tags=["parameters"]
ORDERING = "quant-then-ft"
COMPETITION = "llm-classification-finetuning"
WHEELS_DATASET = "kaggle-utils-wheels"  # offline install of kaggle_utils and the wheels it needs
PACKAGE_DATASET = "kaggle-utils-package"
TRAIN_PATH = None  # None: COMPETITION's train.csv under /kaggle/input (either mount layout), else data/train.csv
OUT_DIR = None  # None: /kaggle/working/<ORDERING> on Kaggle, else runs/<ORDERING>
CONFIG_PATH = None  # a YAML PipelineConfig; None: the defaults (the winners' settings, config.py)
BASE_MODEL_PATH = None  # local checkpoint dir (e.g. an attached Gemma-2 9B); None: the config's base_model
TOKENIZER_PATH = None  # its tokenizer; None: the config's (a locally trained demo tokenizer when unset)
FOLDS_PATH = None  # a shared folds parquet; None: made here from train.csv with the config's seed
CV_FOLDS = [0]  # folds to train (each trains on the others and is scored on itself)
SEEDS = [42]
OVERRIDES = {}  # per-section config changes, e.g. {"train": {"max_steps": 100}, "format": {"max_length": 1024}}

# %% [markdown]
# Offline install: when `kaggle_utils` is not importable (a fresh Kaggle session, internet off), install it
# and
# the pinned wheels from the attached datasets (`build-wheels` wrote their `requirements.txt`).

# %%
import importlib.util
import os
import subprocess
import sys

if importlib.util.find_spec("kaggle_utils") is None:
    folders = [os.path.join("/kaggle/input", slug) for slug in (WHEELS_DATASET, PACKAGE_DATASET) if slug]
    folders = [folder for folder in folders if os.path.isfile(os.path.join(folder, "requirements.txt"))]
    if not folders:
        raise RuntimeError(f"kaggle_utils is not installed and no wheels dataset is attached ({WHEELS_DATASET})")
    command = [sys.executable, "-m", "pip", "install", "--no-index"]
    for folder in folders:
        command += ["--find-links", folder, "-r", os.path.join(folder, "requirements.txt")]
    subprocess.run(command, check=True)
    importlib.invalidate_caches()

# %%
import logging
from pathlib import Path

import polars as pl
from IPython.display import Image, Markdown, display

from kaggle_utils.compare import OOF_FILE, REPORT_MD, REPORT_PNG, compare_orderings
from kaggle_utils.config import PipelineConfig
from kaggle_utils.errors import UsageError
from kaggle_utils.runtime import KAGGLE_INPUT, KAGGLE_WORKING, on_kaggle

logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s", force=True)

cfg = PipelineConfig.from_yaml(CONFIG_PATH) if CONFIG_PATH else PipelineConfig()
merged = cfg.to_dict()
for section, values in OVERRIDES.items():
    merged[section].update(values)
cfg = PipelineConfig.from_dict(merged)
cfg.model.base_model = BASE_MODEL_PATH or cfg.model.base_model
cfg.format.tokenizer_path = TOKENIZER_PATH or cfg.format.tokenizer_path
cfg.train.cv_folds = tuple(CV_FOLDS)

if TRAIN_PATH:
    train_path = Path(TRAIN_PATH)
else:
    candidates = [KAGGLE_INPUT / COMPETITION / "train.csv", KAGGLE_INPUT / "competitions" / COMPETITION / "train.csv",
                  Path("data") / "train.csv"]
    found = [path for path in candidates if path.is_file()]
    if not found:
        raise UsageError(f"no train.csv in {[str(path) for path in candidates]}; set TRAIN_PATH")
    train_path = found[0]
out_dir = Path(OUT_DIR) if OUT_DIR else (KAGGLE_WORKING if on_kaggle() else Path("runs")) / ORDERING
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
import matplotlib.pyplot as plt

run = report["runs"][0]
figure, axis = plt.subplots(figsize=(7, 4))
for fold in run["per_fold"]:
    steps = [point["step"] for point in fold["history"]]
    axis.plot(steps, [point["eval_loss"] for point in fold["history"]], marker="o", label=f"fold {fold['fold']}")
axis.axhline(run["prior_log_loss"], color="grey", linestyle="--", label="class prior")
axis.set_xlabel("optimizer step")
axis.set_ylabel("held-out log loss")
axis.set_title(f"{ORDERING}: evaluation during training")
axis.legend()
figure.tight_layout()
figure.savefig(out_dir / "learning_curves.png", dpi=110)  # kept with the report
plt.close(figure)
display(Image(filename=str(out_dir / "learning_curves.png")))

# %% [markdown]
# ## The artifact to ship
# Upload it as the submission kernel's artifact dataset:
# `python -m kaggle_utils kaggle upload-artifact <artifact_dir> -m "<notes>"`.

# %%
artifacts = pl.DataFrame(
    [{"fold": f["fold"], "log_loss_quantized": f["log_loss_quantized"], "artifact_dir": f["artifact_dir"]}
     for f in run["per_fold"]]
)
display(artifacts)
print(f"OOF predictions: {out_dir / OOF_FILE}")
