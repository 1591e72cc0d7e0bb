"""kernel-metadata.json and dataset-metadata.json: generated from `KaggleConfig`, validated before any push.

`kernel_metadata` / `dataset_metadata` build them; `validate_kernel_metadata` / `validate_dataset_metadata`
list every problem, each naming the file and the field.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kaggle_utils.core.config import KaggleConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.kaggle.client import authenticated_user

KERNEL_METADATA_FILE = "kernel-metadata.json"
DATASET_METADATA_FILE = "dataset-metadata.json"
DATASET_LICENSE = "CC0-1.0"

# Every key `kaggle kernels push` reads; anything else is a typo that the CLI would silently ignore.
KERNEL_METADATA_KEYS: frozenset[str] = frozenset(
    {
        "id",
        "id_no",
        "title",
        "code_file",
        "language",
        "kernel_type",
        "is_private",
        "enable_gpu",
        "enable_tpu",
        "enable_internet",
        "dataset_sources",
        "competition_sources",
        "kernel_sources",
        "model_sources",
        "keywords",
        "docker_image",
        "docker_image_pinning_type",
        "machine_shape",
    }
)
REQUIRED_KERNEL_KEYS: tuple[str, ...] = ("id", "title", "code_file", "language", "kernel_type")
BOOLEAN_KERNEL_KEYS: tuple[str, ...] = ("is_private", "enable_gpu", "enable_tpu", "enable_internet")
LIST_KERNEL_KEYS: tuple[str, ...] = (
    "dataset_sources",
    "competition_sources",
    "kernel_sources",
    "model_sources",
    "keywords",
)

# machine_shape / --accelerator IDs (KAGGLE.md). Retired shapes are accepted by the server but replaced.
GPU_SHAPES: frozenset[str] = frozenset({"NvidiaTeslaT4", "NvidiaL4", "NvidiaTeslaP100"})
TPU_SHAPES: frozenset[str] = frozenset({"TpuV38", "Tpu1VmV38", "TpuV5E8"})
RETIRED_SHAPES: dict[str, str] = {
    "NvidiaTeslaP100": "P100 no longer works with the current image's torch; use NvidiaTeslaT4",
    "TpuV38": "TPU v3-8 is retired (sessions run on TpuV5E8)",
    "Tpu1VmV38": "TPU v3-8 VM is retired (sessions run on TpuV5E8)",
}

_SLUG = re.compile(r"^[a-z0-9](?:[a-z0-9-]*[a-z0-9])?$")
_OWNER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")


def slugify(text: str) -> str:
    """Kaggle's slug of a title: the `python-slugify` function the kaggle CLI itself uses."""
    from slugify import slugify as kaggle_slugify  # a dependency of the kaggle package

    return kaggle_slugify(text)


def title_for_slug(slug: str) -> str:
    """A title that slugifies back to `slug` (Kaggle derives the URL from the title of a new kernel)."""
    return " ".join(part.capitalize() for part in slug.split("-"))


# variants.registry.ORDERINGS, one training kernel each
TRAINING_ORDERINGS: tuple[str, str] = ("ft-then-quant", "quant-then-ft")


@dataclass(frozen=True)
class NotebookKernel:
    """How one kernel runs on Kaggle: which notebook of notebooks/, with which parameters fixed.

    One notebook can be pushed as several kernels (notebooks/train: one kernel per ORDERING); `parameters`
    are the values that select this kernel, injected into every copy pushed as it."""

    name: str  # the kernel's key in `notebook_kernels` (what `reads_kernels` names)
    slug: str
    gpu: bool
    datasets: tuple[str, ...]  # roles: "artifact", "wheels", "package"
    competition_data: bool = True
    base_model: bool = (
        False  # attaches `KaggleConfig.base_model_source` (the checkpoint training starts from)
    )
    reads_kernels: tuple[str, ...] = ()  # names of kernels whose output this one reads
    notebook: str = ""  # notebooks/<notebook>.py (jupytext) and .ipynb; "" means `name`
    parameters: tuple[tuple[str, str], ...] = ()  # (NAME, value) pairs that select this kernel

    @property
    def notebook_name(self) -> str:
        return self.notebook or self.name


def notebook_kernels(cfg: KaggleConfig) -> dict[str, NotebookKernel]:
    """The project's kernels and what each needs attached on Kaggle. Both training kernels run the one
    notebooks/train notebook, each with its ORDERING, so the CV report reads two kernels' outputs."""
    kernels = [
        NotebookKernel(
            "submission", cfg.submission_kernel, gpu=True, datasets=("artifact", "wheels", "package")
        ),
        *(
            NotebookKernel(
                f"train_{ordering.replace('-', '_')}",
                f"arena-train-{ordering}",
                gpu=True,
                datasets=("wheels", "package"),
                base_model=True,
                notebook="train",
                parameters=(("ORDERING", ordering),),
            )
            for ordering in TRAINING_ORDERINGS
        ),
        NotebookKernel(
            "cv_report",
            "arena-cv-report",
            gpu=False,
            datasets=("wheels", "package"),
            reads_kernels=("train_ft_then_quant", "train_quant_then_ft"),
        ),
    ]
    return {kernel.name: kernel for kernel in kernels}


def kernel_for_notebook(
    cfg: KaggleConfig, notebook: str | Path, parameters: Mapping[str, Any] | None = None
) -> NotebookKernel:
    """The kernel a push of `notebook` (notebooks/<name>.ipynb or .py) with these parameters is: the
    notebook's only kernel, or, for a notebook pushed as several, the one whose selecting parameters
    (ORDERING) it sets."""
    kernels = notebook_kernels(cfg)
    candidates = [kernel for kernel in kernels.values() if kernel.notebook_name == Path(notebook).stem]
    if not candidates:
        names = sorted({kernel.notebook_name for kernel in kernels.values()})
        raise UsageError(f"{notebook}: not one of the project's notebooks {names} (see notebooks/)")
    if len(candidates) == 1:
        return candidates[0]
    parameters = dict(parameters or {})
    selectors = sorted({name for kernel in candidates for name, _ in kernel.parameters})
    for name in selectors:
        choices = [value for kernel in candidates for key, value in kernel.parameters if key == name]
        if name not in parameters:
            options = " or ".join(f"-p {name}={value}" for value in choices)
            raise UsageError(f"{notebook}: pushed as one kernel per {name}: pass {options}")
        if parameters[name] not in choices:
            raise UsageError(f"{notebook}: {name}={parameters[name]!r} is not one of {choices}")
    (kernel,) = [k for k in candidates if all(parameters.get(name) == value for name, value in k.parameters)]
    return kernel


def dataset_slug(cfg: KaggleConfig, role: str) -> str | None:
    """The dataset slug configured for a role; None when the role is switched off (package_dataset=None)."""
    slugs = {"artifact": cfg.artifact_dataset, "wheels": cfg.wheels_dataset, "package": cfg.package_dataset}
    if role not in slugs:
        raise UsageError(f"unknown dataset role {role!r}; known: {sorted(slugs)}")
    return slugs[role]


def kernel_metadata(kernel: NotebookKernel, cfg: KaggleConfig, owner: str, code_file: str) -> dict[str, Any]:
    """kernel-metadata.json for one notebook. Internet is always off: every kernel here must run offline, and
    a kernel that reads competition data is scored with internet off anyway."""
    kernels = notebook_kernels(cfg)
    datasets = [f"{owner}/{slug}" for role in kernel.datasets if (slug := dataset_slug(cfg, role))]
    shape = cfg.machine_shape if kernel.gpu else None
    metadata: dict[str, Any] = {
        "id": f"{owner}/{kernel.slug}",
        "title": title_for_slug(kernel.slug),
        "code_file": code_file,
        "language": "python",
        "kernel_type": "notebook",
        "is_private": cfg.is_private,
        "enable_gpu": kernel.gpu and shape in GPU_SHAPES,
        "enable_tpu": kernel.gpu and shape in TPU_SHAPES,
        "enable_internet": False,
        "dataset_sources": datasets,
        "competition_sources": [cfg.competition] if kernel.competition_data else [],
        "kernel_sources": [f"{owner}/{kernels[name].slug}" for name in kernel.reads_kernels],
        "model_sources": [cfg.base_model_source] if kernel.base_model and cfg.base_model_source else [],
        # "original" keeps the image the kernel was first run with, so the wheels keep matching its Python.
        "docker_image_pinning_type": "original",
    }
    if shape:
        metadata["machine_shape"] = shape
    return metadata


def submission_metadata(cfg: KaggleConfig, owner: str) -> dict[str, Any]:
    """The top-level kernel-metadata.json: the submission kernel, pushable from the repository root."""
    kernel = notebook_kernels(cfg)["submission"]
    return kernel_metadata(kernel, cfg, owner, code_file="notebooks/submission.ipynb")


def read_metadata(path: Path) -> dict[str, Any]:
    """A metadata JSON file as a dict; a clear error naming the file when it is missing or not an object."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: file not found") from None
    except json.JSONDecodeError as error:
        raise UsageError(f"{path}: invalid JSON at line {error.lineno}: {error.msg}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path}: expected a JSON object, found {type(data).__name__}")
    return data


def write_metadata(metadata: Mapping[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(dict(metadata), indent=2) + "\n", encoding="utf-8")
    return path


def split_ref(ref: str, parts: int, field: str) -> list[str] | str:
    """Split `owner/slug[/...]` into `parts` pieces, or return a problem message."""
    pieces = ref.split("/") if isinstance(ref, str) else []
    if len(pieces) != parts or not all(pieces):
        shape = (
            "/".join(["owner", "slug", "framework", "variation", "version"][:parts])
            if parts > 2
            else "owner/slug"
        )
        return f"{field}: {ref!r} is not of the form {shape}"
    return pieces


def validate_kernel_metadata(metadata: Mapping[str, Any], where: str = KERNEL_METADATA_FILE) -> list[str]:
    """Every problem the Kaggle CLI would reject, silently ignore or misread, each naming the field."""
    problems: list[str] = []
    unknown = sorted(set(metadata) - KERNEL_METADATA_KEYS)
    if unknown:
        problems.append(f"{where}: unknown keys {unknown} (the kaggle CLI ignores them; typo?)")
    for key in REQUIRED_KERNEL_KEYS:
        if not metadata.get(key):
            problems.append(f"{where}: '{key}' is required")
    for key in BOOLEAN_KERNEL_KEYS:
        if key in metadata and not isinstance(metadata[key], bool):
            problems.append(f"{where}: '{key}' must be true or false, found {metadata[key]!r}")
    for key in LIST_KERNEL_KEYS:
        value = metadata.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            problems.append(f"{where}: '{key}' must be a list of strings, found {value!r}")

    kernel_id = metadata.get("id")
    if isinstance(kernel_id, str) and kernel_id:
        pieces = split_ref(kernel_id, 2, "id")
        if isinstance(pieces, str):
            problems.append(f"{where}: {pieces}")
        else:
            owner, slug = pieces
            if not _OWNER.match(owner):
                problems.append(f"{where}: id owner {owner!r} is not a Kaggle user name")
            if not _SLUG.match(slug):
                problems.append(f"{where}: id slug {slug!r} must be lowercase letters, digits and hyphens")
            title = metadata.get("title")
            if isinstance(title, str) and title:
                if len(title) < 5:
                    problems.append(f"{where}: title {title!r} must be at least 5 characters")
                elif slugify(title) != slug:
                    problems.append(
                        f"{where}: title {title!r} slugifies to {slugify(title)!r}, not the id's slug "
                        f"{slug!r} "
                        "(a new kernel's URL comes from its title)"
                    )

    if metadata.get("language") not in (None, "", "python"):
        problems.append(f"{where}: language must be 'python', found {metadata.get('language')!r}")
    kernel_type = metadata.get("kernel_type")
    code_file = str(metadata.get("code_file") or "")
    if kernel_type not in (None, "", "notebook", "script"):
        problems.append(f"{where}: kernel_type must be 'notebook' or 'script', found {kernel_type!r}")
    elif kernel_type == "notebook" and code_file and not code_file.endswith(".ipynb"):
        problems.append(f"{where}: kernel_type 'notebook' needs an .ipynb code_file, found {code_file!r}")
    elif kernel_type == "script" and code_file and not code_file.endswith(".py"):
        problems.append(f"{where}: kernel_type 'script' needs a .py code_file, found {code_file!r}")

    problems.extend(_accelerator_problems(metadata, where))
    if metadata.get("docker_image_pinning_type") not in (None, "original", "latest"):
        problems.append(f"{where}: docker_image_pinning_type must be 'original' or 'latest'")

    for key, parts in (("dataset_sources", 2), ("kernel_sources", 2), ("model_sources", 5)):
        for ref in metadata.get(key) or []:
            pieces = split_ref(ref, parts, key) if isinstance(ref, str) else f"{key}: {ref!r} is not a string"
            if isinstance(pieces, str):
                problems.append(f"{where}: {pieces}")
            elif key == "model_sources" and not pieces[4].isdigit():
                problems.append(f"{where}: model_sources: version of {ref!r} must be a number")
    for slug in metadata.get("competition_sources") or []:
        if not isinstance(slug, str) or not _SLUG.match(slug):
            problems.append(f"{where}: competition_sources: {slug!r} is not a competition slug")
    return problems


def _accelerator_problems(metadata: Mapping[str, Any], where: str) -> list[str]:
    problems = []
    shape = metadata.get("machine_shape")
    gpu, tpu = metadata.get("enable_gpu") is True, metadata.get("enable_tpu") is True
    if gpu and tpu:
        problems.append(f"{where}: enable_gpu and enable_tpu are both true")
    if shape is None:
        return problems
    if shape in RETIRED_SHAPES:
        problems.append(f"{where}: machine_shape {shape!r}: {RETIRED_SHAPES[shape]}")
    elif shape in GPU_SHAPES and not gpu:
        problems.append(f"{where}: machine_shape {shape!r} is a GPU but enable_gpu is not true")
    elif shape in TPU_SHAPES and not tpu:
        problems.append(f"{where}: machine_shape {shape!r} is a TPU but enable_tpu is not true")
    elif shape not in GPU_SHAPES | TPU_SHAPES:
        problems.append(
            f"{where}: machine_shape {shape!r} is not a known accelerator ({sorted(GPU_SHAPES | TPU_SHAPES)})"
        )
    return problems


def with_accelerator(metadata: Mapping[str, Any], accelerator: str) -> dict[str, Any]:
    """Metadata that says what `--accelerator` will give, so the local check judges the real machine."""
    if accelerator not in GPU_SHAPES | TPU_SHAPES:
        raise UsageError(f"--accelerator {accelerator!r} is not one of {sorted(GPU_SHAPES | TPU_SHAPES)}")
    updated = dict(metadata)
    updated["machine_shape"] = accelerator
    updated["enable_gpu"] = accelerator in GPU_SHAPES
    updated["enable_tpu"] = accelerator in TPU_SHAPES
    return updated


def with_owner(metadata: Mapping[str, Any], owner: str) -> dict[str, Any]:
    """Move a kernel to `owner`, with the sources that belonged to the previous owner (your own datasets and
    kernels); other people's public sources keep their owner. A kernel can only be pushed to your account."""
    updated = dict(metadata)
    old_owner, _, slug = str(metadata.get("id", "")).partition("/")
    if not slug or old_owner == owner:
        return updated
    updated["id"] = f"{owner}/{slug}"
    for key in ("dataset_sources", "kernel_sources", "model_sources"):
        updated[key] = [
            owner + ref[len(old_owner) :] if ref.startswith(old_owner + "/") else ref
            for ref in metadata.get(key) or []
        ]
    return updated


def dataset_metadata(
    owner: str, slug: str, title: str | None = None, existing: Mapping[str, Any] | None = None
):
    """dataset-metadata.json for `datasets create/version`; keeps a hand-written description or subtitle."""
    title = title or title_for_slug(slug)
    metadata: dict[str, Any] = dict(existing or {})
    metadata.update({"title": title, "id": f"{owner}/{slug}", "licenses": [{"name": DATASET_LICENSE}]})
    return metadata


def validate_dataset_metadata(metadata: Mapping[str, Any], where: str = DATASET_METADATA_FILE) -> list[str]:
    """The rules `datasets create` enforces (slug and title 6-50 characters, exactly one license)."""
    problems = []
    pieces = split_ref(metadata.get("id", ""), 2, "id")
    if isinstance(pieces, str):
        problems.append(f"{where}: {pieces}")
    else:
        slug = pieces[1]
        if not _SLUG.match(slug) or not 6 <= len(slug) <= 50:
            problems.append(f"{where}: slug {slug!r} must be 6-50 lowercase letters, digits and hyphens")
    title = metadata.get("title")
    if not isinstance(title, str) or not 6 <= len(title) <= 50:
        problems.append(f"{where}: title {title!r} must be 6-50 characters")
    licenses = metadata.get("licenses")
    if not (isinstance(licenses, list) and len(licenses) == 1 and isinstance(licenses[0], dict)):
        problems.append(f"{where}: licenses must be exactly one entry like [{{'name': '{DATASET_LICENSE}'}}]")
    elif not licenses[0].get("name"):
        problems.append(f"{where}: licenses[0] has no 'name'")
    subtitle = metadata.get("subtitle")
    if subtitle and not 20 <= len(subtitle) <= 80:
        problems.append(f"{where}: subtitle must be 20-80 characters")
    return problems


def resolve_owner(cfg: KaggleConfig, owner: str | None = None, api: Any = None) -> str:
    """Explicit owner, else `cfg.owner`, else the user the client authenticated as."""
    if owner or cfg.owner:
        return str(owner or cfg.owner)
    if api is None:
        raise UsageError("no Kaggle owner: pass --owner NAME or set kaggle.owner in the config")
    return authenticated_user(api)


def write_submission_metadata(path: str | Path, cfg: KaggleConfig, owner: str) -> Path:
    """(Re)write the top-level kernel-metadata.json of the submission kernel from the config."""
    metadata = submission_metadata(cfg, owner)
    problems = validate_kernel_metadata(metadata, str(path))
    if problems:
        raise UsageError("; ".join(problems))
    return write_metadata(metadata, Path(path))
