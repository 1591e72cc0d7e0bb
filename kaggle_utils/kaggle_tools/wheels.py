"""A dataset folder of wheels for a notebook that runs with internet off.

Kaggle's image already has torch and its CUDA stack (never bundled: the image's build matches its GPUs), but
not the versions of transformers / peft / bitsandbytes / polars this repository is tested with. The folder
holds: the kaggle_utils wheel (built from this checkout), the configured packages pinned to the versions
installed HERE, and their dependencies minus the excluded ones, all for Kaggle's Python and platform.
`requirements.txt` pins the top-level packages; the notebook installs with

    pip install --no-index --find-links /kaggle/input/<wheels> -r /kaggle/input/<wheels>/requirements.txt

so pip keeps every dependency the image already satisfies and takes the rest from the folder.
"""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from importlib import metadata as importlib_metadata
from pathlib import Path

from packaging.requirements import InvalidRequirement, Requirement
from packaging.utils import canonicalize_name

from kaggle_utils import __version__
from kaggle_utils.config import KaggleConfig
from kaggle_utils.errors import UsageError
from kaggle_utils.fileio import file_sha256

PACKAGE_NAME = "kaggle-utils"
REQUIREMENTS_FILE = "requirements.txt"
MANIFEST_FILE = "wheels.json"
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")


@dataclass
class WheelsReport:
    """What `build_wheels` put in the folder and what it left out, and why."""

    out_dir: Path
    wheels: list[Path] = field(default_factory=list)
    requirements: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # distribution -> reason

    def install_command(self, mounted_at: str = "/kaggle/input/<dataset>") -> str:
        return f"pip install --no-index --find-links {mounted_at} -r {mounted_at}/{REQUIREMENTS_FILE}"

    def summary(self) -> str:
        size = sum(path.stat().st_size for path in self.wheels) / 2**20
        lines = [f"{self.out_dir}: {len(self.wheels)} wheels, {size:.1f} MiB"]
        lines += [f"  {path.name}" for path in sorted(self.wheels)]
        lines += [f"  left out {name}: {reason}" for name, reason in sorted(self.excluded.items())]
        lines.append(f"  install on Kaggle: {self.install_command()}")
        return "\n".join(lines)


def _is_excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatch(name, canonicalize_name(pattern).replace("-*", "*")) for pattern in exclude)


def dependency_closure(roots: Iterable[str], exclude: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """Installed versions of `roots` and of everything they require (extras off), minus `exclude`
    (fnmatch patterns on canonical names). Returns (name -> version, left-out name -> reason)."""
    exclude = tuple(exclude)
    pins: dict[str, str] = {}
    left_out: dict[str, str] = {}
    pending = [(name, None) for name in roots]
    while pending:
        raw_name, required_by = pending.pop()
        name = canonicalize_name(raw_name)
        if name in pins or name in left_out:
            continue
        if _is_excluded(name, exclude):
            left_out[name] = "excluded: expected in Kaggle's image" + (f" (needed by {required_by})" if required_by else "")
            continue
        try:
            dist = importlib_metadata.distribution(name)
        except importlib_metadata.PackageNotFoundError:
            where = f"needed by {required_by}" if required_by else "listed in kaggle.wheel_packages"
            raise UsageError(f"build-wheels: {name} ({where}) is not installed here, so no version to pin") from None
        pins[name] = dist.version
        for line in dist.requires or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                continue
            if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
                continue
            pending.append((requirement.name, name))
    return pins, left_out


def platform_tags(platform: str) -> list[str]:
    """`manylinux_2_35_x86_64` and every older manylinux tag of that architecture (pip's --platform matches
    exact tags only, and most wheels are tagged for an older glibc)."""
    match = _MANYLINUX.match(platform)
    if not match:
        return [platform]
    major, minor, arch = int(match.group(1)), int(match.group(2)), match.group(3)
    tags = [f"manylinux_{major}_{m}_{arch}" for m in range(minor, 4, -1)]
    legacy = {17: "manylinux2014", 12: "manylinux2010", 5: "manylinux1"}
    tags += [f"{name}_{arch}" for glibc, name in legacy.items() if major == 2 and glibc <= minor]
    return tags


def project_root() -> Path:
    """The checkout kaggle_utils is imported from (build-wheels builds the package wheel from its source)."""
    root = Path(__file__).resolve().parents[2]  # kaggle_utils/kaggle_tools/wheels.py -> checkout root
    if not (root / "pyproject.toml").is_file():
        raise UsageError(f"build-wheels needs the kaggle_utils source checkout; {root} has no pyproject.toml")
    return root


def _run_pip(args: Sequence[str], what: str) -> None:
    command = [sys.executable, "-m", "pip", *args]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        tail = " | ".join((result.stderr or result.stdout).strip().splitlines()[-3:])
        raise UsageError(f"build-wheels: {what} failed (pip exit {result.returncode}): {tail}")


def build_package_wheel(out_dir: Path, root: Path | None = None) -> Path:
    """The kaggle_utils wheel, built offline from the checkout with the build backend installed here."""
    root = root or project_root()
    out_dir.mkdir(parents=True, exist_ok=True)
    for stale in out_dir.glob("kaggle_utils-*.whl"):
        stale.unlink()
    with tempfile.TemporaryDirectory() as tmp:
        _run_pip(["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", tmp, str(root)], "building kaggle_utils")
        built = list(Path(tmp).glob("kaggle_utils-*.whl"))
        if len(built) != 1:
            raise UsageError(f"build-wheels: expected one kaggle_utils wheel, pip produced {built}")
        return Path(shutil.move(str(built[0]), out_dir / built[0].name))


def download_wheels(
    pins: dict[str, str], out_dir: Path, python_version: str, platform: str, pip_args: Sequence[str] = ()
) -> None:
    """`pip download --no-deps` of exact versions, binary only, for the target Python and platform."""
    if not pins:
        return
    args = ["download", "--no-deps", "--only-binary=:all:", "--dest", str(out_dir)]
    args += ["--python-version", python_version]
    for tag in platform_tags(platform):
        args += ["--platform", tag]
    args += list(pip_args)
    args += [f"{name}=={version}" for name, version in sorted(pins.items())]
    _run_pip(args, f"downloading {len(pins)} wheels")


def build_wheels(
    out_dir: str | Path,
    cfg: KaggleConfig | None = None,
    include_package: bool = True,
    include_dependencies: bool = True,
    packages: Sequence[str] | None = None,
    pip_args: Sequence[str] = (),
) -> WheelsReport:
    """Fill `out_dir` with the wheels an offline notebook needs, plus requirements.txt and wheels.json.

    `packages` overrides `cfg.wheel_packages`; an entry `name==version` is downloaded as given (it need not be
    installed here, and its dependencies are not followed). `pip_args` go to `pip download` (an index or
    `--no-index --find-links DIR`)."""
    cfg = cfg or KaggleConfig()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    report = WheelsReport(out)
    if not include_package and not include_dependencies:
        raise UsageError("build-wheels: nothing to build (both the package and its dependencies are off)")

    if include_dependencies:
        for stale in out.glob("*.whl"):  # a rebuilt folder holds exactly the pinned set
            stale.unlink()
        entries = list(cfg.wheel_packages if packages is None else packages)
        explicit = {}
        for entry in entries:
            if "==" in entry:
                name, version = entry.split("==", 1)
                explicit[canonicalize_name(name)] = version.strip()
        roots = [entry for entry in entries if "==" not in entry]
        roots_pinned, report.excluded = dependency_closure(roots, cfg.wheel_exclude)
        pins = {**roots_pinned, **explicit}
        if any(name for name in pins if "+" in pins[name]):
            local = {name: version for name, version in pins.items() if "+" in version}
            raise UsageError(f"build-wheels: local versions cannot be downloaded from an index: {local}")
        print(f"build-wheels: downloading {len(pins)} wheels for Python {cfg.wheel_python_version}, {cfg.wheel_platform}")
        download_wheels(pins, out, cfg.wheel_python_version, cfg.wheel_platform, pip_args)
        top_level = {canonicalize_name(entry.split("==")[0]) for entry in entries}
        report.requirements += [f"{name}=={pins[name]}" for name in sorted(top_level)]

    if include_package:
        print("build-wheels: building the kaggle_utils wheel from the checkout")
        build_package_wheel(out)
        report.requirements.append(f"{PACKAGE_NAME}=={__version__}")

    report.wheels = sorted(out.glob("*.whl"))
    (out / REQUIREMENTS_FILE).write_text("\n".join(report.requirements) + "\n", encoding="utf-8")
    manifest = {
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "python_version": cfg.wheel_python_version,
        "platform": cfg.wheel_platform,
        "requirements": report.requirements,
        "wheels": {path.name: file_sha256(path) for path in report.wheels},
        "left_out": report.excluded,
        "install": report.install_command(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    return report
