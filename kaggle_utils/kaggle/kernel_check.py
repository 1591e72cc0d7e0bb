"""The local check of a kernel folder before `kaggle kernels push`: `check_kernel_folder(folder)`.

Finds a missing code file, incomplete metadata, internet left on, or a `/kaggle/input/<name>` read that no
attached source provides; `check.summary()` reports, `check.raise_if_failed()` blocks the push.
"""

from __future__ import annotations

import ast
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kaggle_utils.core.errors import UsageError
from kaggle_utils.kaggle.metadata import (
    KERNEL_METADATA_FILE,
    read_metadata,
    validate_kernel_metadata,
)

KAGGLE_INPUT = "/kaggle/input"
_INPUT_PATH = re.compile(r"/kaggle/input/([A-Za-z0-9_.\-/]+)")
_MAGIC = re.compile(r"^\s*[!%]")


@dataclass(frozen=True)
class InputRef:
    """One thing a notebook reads: `kind` is dataset, competition, kernel, model or any (a bare mount
    name)."""

    kind: str
    ref: str
    where: str  # e.g. "cell 3" or "parameters cell: WHEELS_DATASET"


@dataclass
class NotebookInputs:
    refs: list[InputRef] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # cells that do not parse


def code_cells(code_path: Path) -> list[tuple[str, str, bool]]:
    """(label, source, is_parameters_cell) for each code cell of an .ipynb, or the whole of a .py script."""
    text = code_path.read_text(encoding="utf-8")
    if code_path.suffix != ".ipynb":
        return [(code_path.name, text, False)]
    try:
        notebook = json.loads(text)
    except json.JSONDecodeError as error:
        raise UsageError(
            f"{code_path}: not a notebook (invalid JSON at line {error.lineno}: {error.msg})"
        ) from None
    cells = notebook.get("cells") if isinstance(notebook, dict) else None
    if not isinstance(cells, list):
        raise UsageError(f"{code_path}: not a notebook (no 'cells' list)")
    found = []
    for index, cell in enumerate(cells, start=1):
        if cell.get("cell_type") != "code":
            continue
        source = cell.get("source", "")
        source = "".join(source) if isinstance(source, list) else str(source)
        tags = (cell.get("metadata") or {}).get("tags") or []
        found.append((f"cell {index}", source, "parameters" in tags))
    return found


def _refs_from_path(path: str, where: str) -> InputRef | None:
    parts = [part for part in path.split("/") if part]
    if not parts:
        return None
    if parts[0] == "competitions" and len(parts) >= 2:
        return InputRef("competition", parts[1], where)
    if parts[0] == "datasets" and len(parts) >= 3:
        return InputRef("dataset", f"{parts[1]}/{parts[2]}", where)
    if parts[0] == "models" and len(parts) >= 3:
        return InputRef("model", f"{parts[1]}/{parts[2]}", where)
    if parts[0] in ("competitions", "datasets", "models"):
        return None  # a listing of the mount layout, not one input
    return InputRef("any", parts[0], where)


def _parameter_kind(name: str) -> str | None:
    lowered = name.lower()
    if lowered == "competition" or lowered.endswith("_competition"):
        return "competition"
    for suffix in ("dataset", "kernel", "model"):
        if lowered.endswith("_" + suffix):
            return suffix
    return None


def _string_values(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, (ast.List, ast.Tuple)):
        return [value for element in node.elts for value in _string_values(element)]
    return []


def find_notebook_inputs(code_path: Path) -> NotebookInputs:
    """Every `/kaggle/input/...` literal and every source named in the parameters cell."""
    inputs = NotebookInputs()
    for label, source, is_parameters in code_cells(code_path):
        for line in source.splitlines():
            if _MAGIC.match(line):
                for match in _INPUT_PATH.finditer(line):
                    if ref := _refs_from_path(match.group(1), f"{label} (shell line)"):
                        inputs.refs.append(ref)
        python = "\n".join("" if _MAGIC.match(line) else line for line in source.splitlines())
        try:
            tree = ast.parse(python)
        except SyntaxError as error:
            inputs.problems.append(
                f"{code_path.name} {label}: syntax error at line {error.lineno}: {error.msg}"
            )
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                for match in _INPUT_PATH.finditer(node.value):
                    if ref := _refs_from_path(match.group(1), label):
                        inputs.refs.append(ref)
            if is_parameters and isinstance(node, (ast.Assign, ast.AnnAssign)) and node.value is not None:
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for target in targets:
                    kind = _parameter_kind(target.id) if isinstance(target, ast.Name) else None
                    if kind is None:
                        continue
                    for value in _string_values(node.value):
                        if value and not value.startswith("/"):
                            inputs.refs.append(InputRef(kind, value, f"parameters cell: {target.id}"))
    first_seen: dict[tuple[str, str], InputRef] = {}
    for ref in inputs.refs:
        first_seen.setdefault((ref.kind, ref.ref), ref)
    inputs.refs = list(first_seen.values())
    return inputs


def _provided_by(ref: InputRef, metadata: dict[str, Any]) -> bool:
    """Whether an attached source mounts what `ref` names (slugs compare case-insensitively)."""
    datasets = [s.lower() for s in metadata.get("dataset_sources") or []]
    kernels = [s.lower() for s in metadata.get("kernel_sources") or []]
    models = [s.lower() for s in metadata.get("model_sources") or []]
    competitions = [s.lower() for s in metadata.get("competition_sources") or []]
    # Kaggle mounts a source at /kaggle/input/<slug> whoever owns it, so an owner/slug reference is compared
    # by its slug: the owner in the metadata is rewritten to the pushing user's (metadata.with_owner).
    pieces = ref.ref.lower().split("/")
    wanted = pieces[1] if len(pieces) > 1 else pieces[0]

    def matches(sources: Iterable[str]) -> bool:
        return any(len(parts := source.split("/")) > 1 and parts[1] == wanted for source in sources)

    if ref.kind == "dataset":
        return matches(datasets)
    if ref.kind == "kernel":
        return matches(kernels)
    if ref.kind == "model":
        return matches(models)
    if ref.kind == "competition":
        return wanted in competitions
    return wanted in competitions or matches(datasets) or matches(kernels) or matches(models)


@dataclass
class KernelCheck:
    """The outcome of `check_kernel_folder`: problems block a push; warnings are printed."""

    folder: Path
    metadata: dict[str, Any]
    problems: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    inputs: list[InputRef] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary(self) -> str:
        lines = [f"kernel folder {self.folder}: {'OK' if self.ok else f'{len(self.problems)} problem(s)'}"]
        lines += [f"  problem: {problem}" for problem in self.problems]
        lines += [f"  warning: {warning}" for warning in self.warnings]
        for ref in self.inputs:
            lines.append(f"  reads {ref.kind} {ref.ref!r} ({ref.where})")
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        if self.problems:
            raise UsageError(f"kernel folder {self.folder} is not ready to push: " + "; ".join(self.problems))


def check_kernel_folder(folder: str | Path) -> KernelCheck:
    """Check a folder that `kaggle kernels push -p FOLDER` would push. Never raises for what it finds."""
    folder = Path(folder)
    meta_path = folder / KERNEL_METADATA_FILE
    if not meta_path.is_file():
        return KernelCheck(folder, {}, problems=[f"{meta_path}: file not found"])
    try:
        metadata = read_metadata(meta_path)
    except UsageError as error:
        return KernelCheck(folder, {}, problems=[str(error)])
    check = KernelCheck(folder, metadata, problems=validate_kernel_metadata(metadata, str(meta_path)))

    is_competition_kernel = bool(metadata.get("competition_sources"))
    if "enable_internet" not in metadata:
        message = f"{meta_path}: enable_internet is missing and the kaggle CLI defaults it to true"
        (check.problems if is_competition_kernel else check.warnings).append(message)
    elif metadata["enable_internet"] is not False and is_competition_kernel:
        check.problems.append(
            f"{meta_path}: enable_internet must be false for a competition kernel (scored offline)"
        )

    code_file = metadata.get("code_file")
    if not code_file:
        return check
    code_path = folder / str(code_file)
    if not code_path.is_file():
        check.problems.append(f"{meta_path}: code_file {code_path} does not exist")
        return check
    try:
        inputs = find_notebook_inputs(code_path)
    except UsageError as error:
        check.problems.append(str(error))
        return check
    check.problems.extend(inputs.problems)
    check.inputs = inputs.refs
    for ref in inputs.refs:
        if not _provided_by(ref, metadata):
            check.problems.append(
                f"{code_path.name} {ref.where} reads {ref.kind} {ref.ref!r}, which no source in "
                f"{meta_path.name} "
                "provides (dataset_sources / competition_sources / kernel_sources / model_sources)"
            )
    return check
