"""A dataset folder of wheels for a notebook that runs with internet off: `build_wheels(out_dir, cfg)`.

It holds the kaggle_utils wheel and the configured packages at the versions installed here, with their
dependencies, for the image in kaggle_utils/resources/kaggle_image.json. The notebook installs with

    pip install --no-index --find-links /kaggle/input/<wheels> -r /kaggle/input/<wheels>/requirements.txt
"""

from __future__ import annotations

import email.parser
import fnmatch
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata as importlib_metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import InvalidRequirement, Requirement
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import Version

from kaggle_utils import __version__
from kaggle_utils.core.config import KAGGLE_IMAGE_FILE, KaggleConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.core.fileio import file_sha256

PACKAGE_NAME = "kaggle-utils"
REQUIREMENTS_FILE = "requirements.txt"
MANIFEST_FILE = "wheels.json"
_MANYLINUX = re.compile(r"^manylinux_(\d+)_(\d+)_(\w+)$")


IMAGE_FILE = KAGGLE_IMAGE_FILE


@dataclass(frozen=True)
class KaggleImage:
    """The notebook image the wheels are for: its Python, platform, and versions of packages it ships
    (canonical name -> version; a shipped package not listed is not checked)."""

    python: str
    platform: str
    packages: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        shipped = ", ".join(f"{name} {version}" for name, version in sorted(self.packages.items()))
        return f"Python {self.python}, {self.platform}" + (f", {shipped}" if shipped else "")


def kaggle_image(path: str | Path = IMAGE_FILE) -> KaggleImage:
    """The target image as kaggle_image.json states it."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        packages = {
            canonicalize_name(name): str(version) for name, version in raw.get("packages", {}).items()
        }
        return KaggleImage(python=str(raw["python"]), platform=str(raw["platform"]), packages=packages)
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise UsageError(f"{path}: not a readable target image ({type(error).__name__}: {error})") from None


@dataclass
class WheelsReport:
    """What `build_wheels` put in the folder and what it left out, and why."""

    out_dir: Path
    wheels: list[Path] = field(default_factory=list)
    requirements: list[str] = field(default_factory=list)
    excluded: dict[str, str] = field(default_factory=dict)  # distribution -> reason
    unchecked: dict[str, str] = field(default_factory=dict)  # required package -> requirement (wheel)
    seconds: float | None = None

    def install_command(self, mounted_at: str = "/kaggle/input/<dataset>") -> str:
        return f"pip install --no-index --find-links {mounted_at} -r {mounted_at}/{REQUIREMENTS_FILE}"

    def summary(self) -> str:
        size = sum(path.stat().st_size for path in self.wheels) / 2**20
        took = f" in {self.seconds:.1f} s" if self.seconds is not None else ""
        lines = [f"{self.out_dir}: {len(self.wheels)} wheels, {size:.1f} MiB{took}"]
        lines += [f"  {path.name}" for path in sorted(self.wheels)]
        lines += [f"  left out {name}: {reason}" for name, reason in sorted(self.excluded.items())]
        lines += [
            f"  not checked (not bundled; its version in the image is not recorded): {requirement}"
            for _, requirement in sorted(self.unchecked.items())
        ]
        lines.append(f"  install on Kaggle: {self.install_command()}")
        return "\n".join(lines)


def wheel_metadata(path: Path) -> email.message.Message:
    """The METADATA of a wheel file (its *.dist-info/METADATA)."""
    try:
        with zipfile.ZipFile(path) as wheel:
            names = [
                name
                for name in wheel.namelist()
                if name.count("/") == 1 and name.endswith(".dist-info/METADATA")
            ]
            if len(names) != 1:
                raise UsageError(
                    f"build-wheels: {path.name} has {len(names)} .dist-info/METADATA files, not one"
                )
            text = wheel.read(names[0]).decode("utf-8", errors="replace")
    except (OSError, zipfile.BadZipFile) as error:
        raise UsageError(f"build-wheels: {path.name} is not a readable wheel ({error})") from None
    return email.parser.Parser().parsestr(text, headersonly=True)


def _target_environment(python_version: str, platform: str) -> dict[str, str]:
    """Marker values for the target image (extras off), for Requires-Dist lines such as `x; python_version <
    "3.12"`."""
    environment = dict(default_environment())
    release = Version(python_version).release
    environment.update(
        python_version=".".join(str(part) for part in (release + (0,))[:2]),
        python_full_version=".".join(str(part) for part in (release + (0, 0))[:3]),
        sys_platform="linux",
        platform_system="Linux",
        os_name="posix",
        implementation_name="cpython",
        platform_python_implementation="CPython",
        extra="",
    )
    machine = _MANYLINUX.match(platform)
    if machine:
        environment["platform_machine"] = machine.group(3)
    return environment


def check_against_image(
    wheels: Iterable[Path], python_version: str, image: KaggleImage, source: str | Path = IMAGE_FILE
) -> dict[str, str]:
    """Raise a one-line UsageError naming the wheel and the requirement unless every wheel installs on
    `image` (Requires-Python, and Requires-Dist against the image's or the bundled versions). Returns what
    could not be checked (package not bundled, no version in the image): name -> "requirement (wheel)".
    """
    wheels = sorted(wheels)
    bundled: dict[str, str] = {}
    for path in wheels:
        try:
            name, version, _, _ = parse_wheel_filename(path.name)
        except InvalidWheelFilename as error:
            raise UsageError(f"build-wheels: {path.name}: not a wheel file name ({error})") from None
        bundled[canonicalize_name(name)] = str(version)
    environment = _target_environment(python_version, image.platform)
    target_python = Version(python_version)
    source = Path(source).name
    unchecked: dict[str, str] = {}
    for path in wheels:
        metadata = wheel_metadata(path)
        requires_python = metadata.get("Requires-Python")
        if requires_python:
            try:
                allowed = SpecifierSet(requires_python).contains(target_python, prereleases=True)
            except InvalidSpecifier:
                raise UsageError(
                    f"build-wheels: {path.name}: unreadable Requires-Python {requires_python!r}"
                ) from None
            if not allowed:
                raise UsageError(
                    f"build-wheels: {path.name} requires Python {requires_python}, but the target image "
                    f"has Python {python_version} (kaggle.wheel_python_version, by default {source}'s)"
                )
        for line in metadata.get_all("Requires-Dist") or []:
            try:
                requirement = Requirement(line)
            except InvalidRequirement:
                raise UsageError(f"build-wheels: {path.name}: unreadable Requires-Dist {line!r}") from None
            if requirement.marker is not None and not requirement.marker.evaluate(environment):
                continue
            name = canonicalize_name(requirement.name)
            shown = f"{requirement.name}{requirement.specifier}"
            if name in image.packages:
                if not requirement.specifier.contains(image.packages[name], prereleases=True):
                    raise UsageError(
                        f"build-wheels: {path.name} requires {shown}, but the target image has "
                        f"{name} {image.packages[name]} ({source})"
                    )
            elif name in bundled:
                if not requirement.specifier.contains(bundled[name], prereleases=True):
                    raise UsageError(
                        f"build-wheels: {path.name} requires {shown}, but the bundle has "
                        f"{name} {bundled[name]}"
                    )
            else:
                unchecked.setdefault(name, f"{shown} ({path.name})")
    return unchecked


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
            left_out[name] = "excluded: expected in Kaggle's image" + (
                f" (needed by {required_by})" if required_by else ""
            )
            continue
        try:
            dist = importlib_metadata.distribution(name)
        except importlib_metadata.PackageNotFoundError:
            where = f"needed by {required_by}" if required_by else "listed in kaggle.wheel_packages"
            raise UsageError(
                f"build-wheels: {name} ({where}) is not installed here, so no version to pin"
            ) from None
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
    root = Path(__file__).resolve().parents[2]  # kaggle_utils/kaggle/wheels.py -> checkout root
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
        _run_pip(
            ["wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", tmp, str(root)],
            "building kaggle_utils",
        )
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
    image: KaggleImage | None = None,
) -> WheelsReport:
    """Fill `out_dir` with the wheels an offline notebook needs, plus requirements.txt and wheels.json.

    `packages` overrides `cfg.wheel_packages`; an entry `name==version` is downloaded as given (it need not be
    installed here, and its dependencies are not followed). `pip_args` go to `pip download` (an index or
    `--no-index --find-links DIR`). Every wheel in the folder is checked against `image` (default:
    kaggle_image.json) for Python `cfg.wheel_python_version` (`check_against_image`); on a failure the folder
    keeps its wheels but no requirements.txt or wheels.json, so it is not taken for a built bundle."""
    started = time.monotonic()
    cfg = cfg or KaggleConfig()
    image = image or kaggle_image()
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
        print(
            f"build-wheels: downloading {len(pins)} wheels for Python {cfg.wheel_python_version}, "
            f"{cfg.wheel_platform}"
        )
        download_wheels(pins, out, cfg.wheel_python_version, cfg.wheel_platform, pip_args)
        top_level = {canonicalize_name(entry.split("==")[0]) for entry in entries}
        report.requirements += [f"{name}=={pins[name]}" for name in sorted(top_level)]

    if include_package:
        print("build-wheels: building the kaggle_utils wheel from the checkout")
        build_package_wheel(out)
        report.requirements.append(f"{PACKAGE_NAME}=={__version__}")

    report.wheels = sorted(out.glob("*.whl"))
    try:
        report.unchecked = check_against_image(report.wheels, cfg.wheel_python_version, image)
    except UsageError:
        for stale in (out / REQUIREMENTS_FILE, out / MANIFEST_FILE):
            stale.unlink(missing_ok=True)
        raise
    (out / REQUIREMENTS_FILE).write_text("\n".join(report.requirements) + "\n", encoding="utf-8")
    manifest = {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "python_version": cfg.wheel_python_version,
        "platform": cfg.wheel_platform,
        "image": {"python": image.python, "platform": image.platform, "packages": image.packages},
        "requirements": report.requirements,
        "wheels": {path.name: file_sha256(path) for path in report.wheels},
        "left_out": report.excluded,
        "unchecked": report.unchecked,
        "install": report.install_command(),
    }
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    report.seconds = time.monotonic() - started
    return report
