"""`--help` and the light commands never import torch or transformers (one fresh interpreter runs them
all)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "transformers", "bitsandbytes", "peft")

# Runs in a fresh interpreter: every command's --help, then the light commands on tiny generated files,
# recording after each which heavy libraries are loaded. Prints one JSON object {label: [loaded, ...]}.
SCRIPT = r"""
import argparse, contextlib, io, json, sys, tempfile
from pathlib import Path

from kaggle_utils.cli.main import build_parser, main

HEAVY = __HEAVY__
seen = {}


def run(label, argv):
    out = io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            code = main(argv)
        except SystemExit as exit:
            code = exit.code
    seen[label] = {"code": code, "loaded": [name for name in HEAVY if name in sys.modules]}


def commands(parser, prefix=()):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield (*prefix, name)
                yield from commands(sub, (*prefix, name))


run("--help", ["--help"])
for command in commands(build_parser()):
    run(" ".join(command) + " --help", [*command, "--help"])

from kaggle_utils.data.dialects import get_dialect

tmp = Path(tempfile.mkdtemp())
files = get_dialect("lmsys").generate_sample(tmp / "data", n_train=60, n_test=10, seed=0)
test_ids = [line.split(",")[0] for line in files.test_csv.read_text().splitlines()[1:]]
submission = tmp / "submission.csv"
submission.write_text(
    "id,winner_model_a,winner_model_b,winner_tie\n" + "".join(f"{i},0.4,0.4,0.2\n" for i in test_ids)
)
run("validate-data", ["validate-data", str(files.train_csv)])
folds_out = str(tmp / "folds.parquet")
run("folds", ["folds", "--train", str(files.train_csv), "--out", folds_out, "--n-folds", "3"])
run("validate-submission", ["validate-submission", str(submission), "--test", str(files.test_csv)])
(tmp / "artifact").mkdir()
(tmp / "artifact" / "manifest.json").write_text("{}")
run("find-inputs", ["find-inputs", str(tmp)])
run("kaggle check-kernel", ["kaggle", "check-kernel", __ROOT__])
metadata_out = str(tmp / "kernel-metadata.json")
run("kaggle metadata", ["kaggle", "metadata", "--owner", "someone", "--out", metadata_out])
print(json.dumps(seen))
"""


def test_help_and_light_commands_load_neither_torch_nor_transformers():
    script = SCRIPT.replace("__HEAVY__", repr(HEAVY)).replace("__ROOT__", repr(str(ROOT)))
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=900, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    seen = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(seen) >= 30, sorted(seen)  # every command's --help (25 today) and the light commands ran
    loaded = {label: result["loaded"] for label, result in seen.items() if result["loaded"]}
    assert not loaded, f"heavy libraries loaded by: {loaded}"
    failed = {label: result["code"] for label, result in seen.items() if result["code"] not in (0, 1)}
    assert not failed, f"commands that failed: {failed}"
    for label in ("validate-data", "folds", "validate-submission", "find-inputs", "kaggle metadata"):
        assert seen[label]["code"] == 0, (label, seen[label])
