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
# # CV report: which ordering ships the better classifier?
#
# Joins the outputs of the two training notebooks (or one `compare-orderings` run) into one report:
# held-out log loss of the shipped quantized artifact, QiD against one common reference (the fine-tune ->
# quantize 16-bit LoRA model merged in fp32; comparable across orderings), each variant's gap to its own 16-bit
# reference, accuracy, training time, memory, artifact size and inference speed, and whether the winner's lead is
# larger than the noise of the paired per-row differences. The runs must share the folds file and seeds (checked).
# Logic: `kaggle_utils.studies.combine.combine_reports` and `kaggle_utils.studies.orderings`.

# %%
import os

# Offline: the Hugging Face libraries must not look anything up (bitsandbytes' import asks the Hub for a CPU
# kernel; behind a firewall that drops packets it would hang). Set before any of them is imported.
for _name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_name, "1")

# %% tags=["parameters"]
REPORT_DIRS = None  # folders holding report.json; None: every one found under INPUT_ROOT
INPUT_ROOT = None  # None: /kaggle/input on Kaggle (the training kernels' outputs), else runs/
FT_THEN_QUANT_KERNEL = "arena-train-ft-then-quant"  # the training kernels this one reads on Kaggle
QUANT_THEN_FT_KERNEL = "arena-train-quant-then-ft"
OUT_DIR = None  # None: /kaggle/working/cv_report on Kaggle, else runs/cv_report

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
from pathlib import Path

import polars as pl
from IPython.display import Image, Markdown, display

from kaggle_utils.core.environment import KAGGLE_INPUT, on_kaggle, run_output_dir
from kaggle_utils.core.metrics import load_oof, score_oof
from kaggle_utils.evaluate.report_render import plot_learning_curves
from kaggle_utils.studies.combine import combine_reports, find_report_dirs
from kaggle_utils.studies.orderings import OOF_FILE, REPORT_MD, REPORT_PNG

out_dir = run_output_dir("cv_report", OUT_DIR)
root = Path(INPUT_ROOT) if INPUT_ROOT else (KAGGLE_INPUT if on_kaggle() else Path("runs"))
if REPORT_DIRS:
    report_dirs = [Path(folder) for folder in REPORT_DIRS]
else:
    report_dirs = [folder for folder in find_report_dirs(root) if folder.resolve() != out_dir.resolve()]
print("reports:", *report_dirs, sep="\n  ")
report = combine_reports(report_dirs, out_dir)

# %% [markdown]
# ## Decision and the comparison table

# %%
print(report.statement)
# what ships: every candidate (each ordering, the class prior, calibrated versions, the blend) ranked on the same rows
print(report.ship["statement"] if report.ship else f"no ship decision: {report.other.get('ship_skipped')}")
print("upload this as the submission's artifact:", report.shipped_artifact)
display(Markdown((out_dir / REPORT_MD).read_text()))

# %%
summary = pl.DataFrame(
    [
        {
            "variant": v["variant"],
            "cv_log_loss_16bit": v["cv_log_loss_16bit"]["mean"],
            "cv_log_loss_quantized": v["cv_log_loss_quantized"]["mean"],
            "qid_vs_common": (v.get("qid_vs_common") or {}).get("mean"),
            "gap_vs_own_reference": v["gap_vs_own_reference"]["mean"],
            "accuracy_quantized": v["accuracy_quantized"]["mean"],
            "train_wall_time_s": v["train_wall_time_s"]["mean"],
            "peak_rss_mb": v["peak_rss_bytes"]["mean"] / 1e6,
            "artifact_mb": v["artifact_bytes"]["mean"] / 1e6,
            "inference_rows_per_s": v["inference_rows_per_s"]["mean"],
        }
        for v in report.variants
    ]
).sort("cv_log_loss_quantized")
display(summary)

# %% [markdown]
# ## Charts: CV log loss, QiD, training time, artifact size

# %%
display(Image(filename=str(out_dir / REPORT_PNG)))

# %% [markdown]
# ## Out-of-fold scores per fold (16-bit and shipped), with the class-prior reference on the same rows

# %%
oof = load_oof(out_dir / OOF_FILE)
scores = [score_oof(oof, name) for name in sorted(oof["name"].unique().to_list())]
per_fold = pl.DataFrame(
    [
        {"name": s.name, "fold": fold, "log_loss": value, "prior_log_loss": s.prior_log_loss, "rows": s.rows}
        for s in scores
        for fold, value in sorted(s.per_fold.items())
    ]
)
display(per_fold)

# %% [markdown]
# ## Learning curves: held-out log loss during training

# %%
curves = plot_learning_curves(report, out_dir / "learning_curves.png")  # kept with the report
display(Image(filename=str(curves)))
