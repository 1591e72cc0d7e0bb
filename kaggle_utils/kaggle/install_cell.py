"""The one offline-install cell every notebook runs first on Kaggle, written here and nowhere else.

`INSTALL_CELL_SOURCE` is the text of the code cell tagged `offline-install`: `inject_install_cell` writes it
into a built kernel, `sync_install_cells` (`kaggle sync-install-cell`) into notebooks/, and
`install_cell_problem` says when a notebook's copy differs.
"""

from __future__ import annotations

from pathlib import Path

from kaggle_utils.core.errors import UsageError

INSTALL_CELL_TAG = "offline-install"

INSTALL_CELL_SOURCE = """\
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
    importlib.invalidate_caches()"""


def _tagged(cells: list, where: str) -> object:
    tagged = [cell for cell in cells if INSTALL_CELL_TAG in (cell.get("metadata") or {}).get("tags", [])]
    if len(tagged) != 1 or tagged[0].get("cell_type") != "code":
        raise UsageError(
            f"{where}: needs exactly one code cell tagged '{INSTALL_CELL_TAG}', found {len(tagged)}"
        )
    return tagged[0]


def install_cell_problem(path: str | Path) -> str | None:
    """Why the notebook (.ipynb or py:percent .py) does not carry the canonical install cell, or None."""
    import jupytext

    path = Path(path)
    try:
        cell = _tagged(jupytext.read(path).cells, str(path))
    except UsageError as error:
        return str(error)
    if cell.source.strip() != INSTALL_CELL_SOURCE:
        return (
            f"{path}: the '{INSTALL_CELL_TAG}' cell differs from the template; run `kaggle sync-install-cell`"
        )
    return None


def inject_install_cell(path: str | Path, source_notebook: str | Path | None = None) -> None:
    """Write the template into the tagged cell of a built .ipynb (the copy that is pushed); errors name
    `source_notebook`, the file to fix."""
    import nbformat

    path = Path(path)
    notebook = nbformat.read(path, as_version=4)
    _tagged(notebook.cells, str(source_notebook or path)).source = INSTALL_CELL_SOURCE
    nbformat.write(notebook, path)


def sync_install_cells(notebooks_dir: str | Path) -> list[Path]:
    """Rewrite the tagged cell of every notebooks/<name>.py and its paired .ipynb from the template; returns
    the files changed. A notebook without exactly one tagged cell is an error (nothing is written)."""
    import jupytext
    import nbformat

    files = sorted(Path(notebooks_dir).glob("*.py")) + sorted(Path(notebooks_dir).glob("*.ipynb"))
    if not files:
        raise UsageError(f"{notebooks_dir}: no notebooks (*.py, *.ipynb)")
    loaded = {}
    for path in files:
        notebook = jupytext.read(path) if path.suffix == ".py" else nbformat.read(path, as_version=4)
        loaded[path] = (notebook, _tagged(notebook.cells, str(path)))
    changed = []
    for path, (notebook, cell) in loaded.items():
        if cell.source.strip() == INSTALL_CELL_SOURCE:
            continue
        cell.source = INSTALL_CELL_SOURCE
        if path.suffix == ".py":
            jupytext.write(notebook, path, fmt="py:percent")
        else:
            nbformat.write(notebook, path)
        changed.append(path)
    return changed
