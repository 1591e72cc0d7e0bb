"""From this repository to Kaggle: kernel folders, datasets, competition data, code submissions.

Behind `python -m kaggle_utils kaggle push|upload-artifact|download|submit|status`, e.g.

    push_notebook("notebooks/train.py", cfg, dry_run=True, parameters={"ORDERING": "ft-then-quant"})
    upload_dataset("runs/ft-then-quant/artifact", cfg)
"""

from __future__ import annotations

import ast
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaggle_utils.core.config import KaggleConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.kaggle.client import kaggle_api, kaggle_errors
from kaggle_utils.kaggle.install_cell import inject_install_cell
from kaggle_utils.kaggle.kernel_check import KernelCheck, check_kernel_folder
from kaggle_utils.kaggle.metadata import (
    DATASET_METADATA_FILE,
    KERNEL_METADATA_FILE,
    dataset_metadata,
    dataset_slug,
    kernel_for_notebook,
    kernel_metadata,
    read_metadata,
    resolve_owner,
    validate_dataset_metadata,
    with_accelerator,
    with_owner,
    write_metadata,
)
from kaggle_utils.kaggle.upload import ARTIFACT_MANIFEST, UploadPlan, plan_upload, stage_upload
from kaggle_utils.kaggle.wheels import MANIFEST_FILE as WHEELS_MANIFEST
from kaggle_utils.kaggle.wheels import WheelsReport, build_wheels, project_root

__all__ = [
    "KernelCheck",
    "PushResult",
    "UploadPlan",
    "WheelsReport",
    "build_kernel_folder",
    "build_wheels",
    "check_kernel_folder",
    "download_competition",
    "kernel_status",
    "parse_parameters",
    "plan_upload",
    "push_notebook",
    "submit_kernel",
    "upload_dataset",
]


def _write_notebook(notebook: Path, target: Path) -> None:
    """Copy an .ipynb; convert a jupytext py:percent script (the reviewed source) to .ipynb."""
    if not notebook.is_file():
        raise UsageError(f"{notebook}: notebook not found")
    if notebook.suffix == ".ipynb":
        shutil.copyfile(notebook, target)
    elif notebook.suffix == ".py":
        import jupytext

        jupytext.write(jupytext.read(notebook, fmt="py:percent"), target, fmt="ipynb")
    else:
        raise UsageError(f"{notebook}: expected a .ipynb notebook or its py:percent script")


def parse_parameters(pairs: list[str] | None) -> dict[str, Any]:
    """`NAME=VALUE` pairs from the command line; VALUE is a Python literal when it parses as one, else a
    string."""
    parameters: dict[str, Any] = {}
    for pair in pairs or []:
        name, sep, raw = pair.partition("=")
        if not sep or not name.isidentifier():
            raise UsageError(f"--param {pair!r}: expected NAME=VALUE")
        try:
            parameters[name] = ast.literal_eval(raw)
        except (ValueError, SyntaxError):
            parameters[name] = raw
    return parameters


def _inject_parameters(path: Path, parameters: dict[str, Any]) -> None:
    """Papermill's injected-parameters cell after the `parameters` cell, so the pushed run uses these
    values."""
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    notebook = nbformat.read(path, as_version=4)
    tagged = [c for c in notebook.cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise UsageError(f"{path}: --param needs exactly one cell tagged 'parameters', found {len(tagged)}")
    known = {
        target.id
        for node in ast.parse(tagged[0].source).body
        if isinstance(node, (ast.Assign, ast.AnnAssign))
        for target in (node.targets if isinstance(node, ast.Assign) else [node.target])
        if isinstance(target, ast.Name)
    }
    unknown = sorted(set(parameters) - known)
    if unknown:
        raise UsageError(f"{path}: no parameters {unknown} in its parameters cell (known: {sorted(known)})")
    notebook = parameterize_notebook(
        load_notebook_node(str(path)), parameters, kernel_name="python3", language="python"
    )
    nbformat.write(notebook, path)


def build_kernel_folder(
    notebook: str | Path,
    cfg: KaggleConfig,
    owner: str,
    out_dir: str | Path | None = None,
    accelerator: str | None = None,
    submission_metadata_path: str | Path | None = None,
    parameters: dict[str, Any] | None = None,
) -> Path:
    """Build the kernel folder (default `cfg.build_dir/kernels/<slug>/`): the notebook as .ipynb, with the
    install-cell template and `parameters` (which pick the kernel of a notebook pushed as several), plus its
    kernel-metadata.json (the submission kernel's is the top-level file; the others' come from `cfg`)."""
    notebook = Path(notebook)
    kernel = kernel_for_notebook(cfg, notebook, parameters)
    parameters = {**(parameters or {}), **dict(kernel.parameters)}  # the selecting values, stated in the copy
    code_file = f"{kernel.notebook_name}.ipynb"
    if kernel.name == "submission":
        source = Path(submission_metadata_path or project_root() / KERNEL_METADATA_FILE)
        metadata = read_metadata(source)
        metadata["code_file"] = code_file
        metadata = with_owner(metadata, owner)
    else:
        metadata = kernel_metadata(kernel, cfg, owner, code_file)
    if accelerator:
        metadata = with_accelerator(metadata, accelerator)
    slug = str(metadata["id"]).partition("/")[2]
    folder = Path(out_dir) if out_dir else Path(cfg.build_dir) / "kernels" / slug
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    _write_notebook(notebook, folder / code_file)
    inject_install_cell(folder / code_file, notebook)
    if parameters:
        _inject_parameters(folder / code_file, parameters)
    write_metadata(metadata, folder / KERNEL_METADATA_FILE)
    return folder


@dataclass
class PushResult:
    folder: Path
    kernel: str  # owner/slug
    version: int | None
    url: str | None


def push_notebook(
    notebook: str | Path,
    cfg: KaggleConfig,
    owner: str | None = None,
    accelerator: str | None = None,
    dry_run: bool = False,
    timeout_s: int | None = None,
    parameters: dict[str, Any] | None = None,
) -> PushResult:
    """Build the kernel folder, check it, then `kernels push` it (unless dry_run) with `--accelerator`.

    A dry run with an owner (`owner` or `cfg.owner`) needs no credential; without one, the owner is the
    authenticated user, so the missing-credential error also names --owner and kaggle.owner."""
    if dry_run and (owner or cfg.owner):
        api = None
    elif dry_run:
        try:
            api = kaggle_api()
        except UsageError as error:
            raise UsageError(
                f"{error}; --dry-run needs no credential with --owner NAME (or kaggle.owner in the config)"
            ) from None
    else:
        api = kaggle_api()
    folder = build_kernel_folder(
        notebook, cfg, resolve_owner(cfg, owner, api), accelerator=accelerator, parameters=parameters
    )
    check = check_kernel_folder(folder)
    print(check.summary())
    check.raise_if_failed()
    kernel = str(check.metadata["id"])
    if dry_run:
        return PushResult(folder, kernel, None, None)
    with kaggle_errors(f"kernels push of {folder}"):
        response = api.kernels_push(
            str(folder), timeout=str(timeout_s) if timeout_s else None, acc=accelerator
        )
    if response is None or response.error:
        raise UsageError(
            f"kernels push of {folder} failed: {getattr(response, 'error', None) or 'no response'}"
        )
    invalid = {
        "dataset sources": response.invalid_dataset_sources,
        "competition sources": response.invalid_competition_sources,
        "kernel sources": response.invalid_kernel_sources,
        "model sources": response.invalid_model_sources,
    }
    for what, refs in invalid.items():
        if refs:
            raise UsageError(
                f"Kaggle saved {kernel} but rejected its {what} {refs}: the run cannot read them"
            )
    print(f"pushed {kernel} version {response.version_number}: {response.url}")
    return PushResult(folder, kernel, response.version_number, response.url or None)


def _dataset_role(directory: Path) -> str:
    """artifact (manifest.json), package (only the kaggle_utils wheel) or wheels (wheels.json)."""
    if (directory / ARTIFACT_MANIFEST).is_file():
        return "artifact"
    if (directory / WHEELS_MANIFEST).is_file():
        wheels = list(directory.glob("*.whl"))
        return "package" if wheels and all(w.name.startswith("kaggle_utils-") for w in wheels) else "wheels"
    raise UsageError(
        f"{directory}: neither an artifact ({ARTIFACT_MANIFEST}) nor a build-wheels folder "
        f"({WHEELS_MANIFEST}); "
        "pass --role or --slug"
    )


def upload_dataset(
    directory: str | Path,
    cfg: KaggleConfig,
    role: str | None = None,
    slug: str | None = None,
    title: str | None = None,
    message: str = "update",
    owner: str | None = None,
    dir_mode: str = "zip",
    include: list[str] | None = None,
) -> dict[str, Any]:
    """Upload exactly the files `plan_upload` lists as `datasets create` (new) or `datasets version`.

    Prints the files sent and left out first; subfolders go up as `dir_mode` (zip or tar) archives, since the
    client skips plain subfolders."""
    directory = Path(directory)
    if not directory.is_dir():
        raise UsageError(f"{directory}: not a directory")
    if dir_mode not in ("zip", "tar"):
        raise UsageError(f"--dir-mode {dir_mode!r}: use zip or tar (other modes drop subfolders)")
    marked = (directory / ARTIFACT_MANIFEST).is_file() or (directory / WHEELS_MANIFEST).is_file()
    role = role or ("dataset" if slug and not marked else _dataset_role(directory))
    plan = plan_upload(directory, include)
    slug = slug or dataset_slug(cfg, role)
    if not slug:
        raise UsageError(f"no dataset slug for role {role!r} (kaggle.{role}_dataset is None); pass --slug")

    api = kaggle_api()
    owner = resolve_owner(cfg, owner, api)
    meta_path = directory / DATASET_METADATA_FILE
    existing = read_metadata(meta_path) if meta_path.is_file() else None
    metadata = dataset_metadata(owner, slug, title, existing)
    problems = validate_dataset_metadata(metadata, str(meta_path))
    if problems:
        raise UsageError("; ".join(problems))
    write_metadata(metadata, meta_path)  # kept with the folder, so the next upload keeps title and license
    ref = metadata["id"]
    folders = sorted({name.split("/", 1)[0] for name in plan.files if "/" in name})
    print(f"uploading to dataset {ref} (folders as {dir_mode} archives: {folders})")
    print(plan.summary())

    import requests

    with tempfile.TemporaryDirectory(prefix="kaggle-upload-") as tmp:
        staging = stage_upload(plan, Path(tmp) / directory.name)
        write_metadata(metadata, staging / DATASET_METADATA_FILE)
        with kaggle_errors(f"dataset upload of {directory} to {ref}"):
            try:
                api.dataset_status(ref)
                exists = True
            except requests.HTTPError as error:
                if error.response is None or error.response.status_code != 404:
                    raise
                exists = False
            if exists:
                response = api.dataset_create_version(str(staging), message, quiet=False, dir_mode=dir_mode)
            else:
                response = api.dataset_create_new(
                    str(staging), public=not cfg.is_private, quiet=False, dir_mode=dir_mode
                )
    if response is None or response.error:
        raise UsageError(
            f"dataset upload to {ref} failed: {getattr(response, 'error', None) or 'no response'}"
        )
    action = "new version of" if exists else "created"
    print(f"{action} dataset {ref}: {response.url} (processing on Kaggle takes a few minutes)")
    return {"ref": ref, "created": not exists, "url": response.url, "role": role, "files": dict(plan.files)}


def download_competition(
    cfg: KaggleConfig, path: str | Path, competition: str | None = None, force: bool = False
):
    """Competition files, unzipped into `path` (the competition's rules must be accepted on the website)."""
    competition = competition or cfg.competition
    api = kaggle_api()
    target = Path(path)
    hint = f" (accept the rules at https://www.kaggle.com/competitions/{competition}/rules)"
    with kaggle_errors(f"download of competition {competition}{hint}"):
        api.competition_download_files(competition, path=str(target), force=force, quiet=False, unzip=True)
    files = sorted(p for p in target.rglob("*") if p.is_file())
    print(f"{competition}: {len(files)} files in {target}")
    return files


def _default_kernel(cfg: KaggleConfig, kernel: str | None, owner: str | None, api: Any) -> str:
    if kernel:
        return kernel if "/" in kernel else f"{resolve_owner(cfg, owner, api)}/{kernel}"
    return f"{resolve_owner(cfg, owner, api)}/{cfg.submission_kernel}"


def submit_kernel(
    cfg: KaggleConfig,
    version: int,
    message: str,
    kernel: str | None = None,
    owner: str | None = None,
    file_name: str = "submission.csv",
    competition: str | None = None,
) -> dict[str, Any]:
    """Code-competition submission: Kaggle reruns `kernel` at `version` on the hidden test set."""
    api = kaggle_api()
    kernel = _default_kernel(cfg, kernel, owner, api)
    competition = competition or cfg.competition
    with kaggle_errors(f"submission of {kernel} version {version} to {competition}"):
        response = api.competition_submit_code(
            file_name=file_name,
            message=message,
            competition=competition,
            kernel=kernel,
            kernel_version=int(version),
            quiet=True,
        )
    print(f"submitted {kernel} version {version} to {competition}: {response.message}")
    return {
        "kernel": kernel,
        "version": int(version),
        "competition": competition,
        "message": response.message,
    }


def kernel_status(
    cfg: KaggleConfig, kernel: str | None = None, owner: str | None = None, submissions: int = 0
) -> dict[str, Any]:
    """A kernel's run status (and failure message), plus the competition's latest submissions if asked."""
    api = kaggle_api()
    kernel = _default_kernel(cfg, kernel, owner, api)
    with kaggle_errors(f"status of {kernel}"):
        response = api.kernels_status(kernel)
    status = str(response.status).rsplit(".", 1)[-1]
    result: dict[str, Any] = {"kernel": kernel, "status": status, "failure_message": response.failure_message}
    print(f"{kernel}: {status}" + (f" ({response.failure_message})" if response.failure_message else ""))
    if submissions:
        with kaggle_errors(f"submissions of {cfg.competition}"):
            rows = api.competition_submissions(cfg.competition, page_size=submissions) or []
        result["submissions"] = []
        for row in rows[:submissions]:
            entry = {
                "date": str(row.date),
                "description": row.description,
                "status": str(row.status).rsplit(".", 1)[-1],
                "public_score": row.public_score,
                "private_score": row.private_score,
            }
            result["submissions"].append(entry)
            print(
                f"  {entry['date']}  {entry['status']:<9} public {entry['public_score'] or '-':>8}  "
                f"private {entry['private_score'] or '-':>8}  {entry['description'] or ''}"
            )
    return result
