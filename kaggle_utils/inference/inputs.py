"""Where a Kaggle run's inputs are: the artifact, the test file, the fallback baseline and the wheels,
found under /kaggle/input (a path given is used as given; hints match whole path names). No torch.

    found = find_inputs("/kaggle/input", artifact_hint="arena-ensemble")
"""

from __future__ import annotations

import fnmatch
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from kaggle_utils.core.environment import default_input_root
from kaggle_utils.core.errors import UsageError
from kaggle_utils.quant.layout import MANIFEST_NAME

WHEEL_GLOB = "kaggle_utils-*.whl"

_MAX_DEPTH = 8

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class FoundInputs:
    """What the submission notebook needs, found under an input root (no hard-coded mount layout)."""

    artifact_dir: Path
    test_path: Path
    wheels_dir: Path | None = None
    baseline_path: Path | None = None

    def describe(self) -> str:
        return (
            f"artifact {self.artifact_dir}; test {self.test_path}; wheels {self.wheels_dir or '-'}; "
            f"baseline {self.baseline_path or '-'}"
        )


def _walk(root: Path) -> list[tuple[Path, list[str], list[str]]]:
    """Directories under root (links followed, hidden ones skipped, depth-limited); an artifact's own
    subfolders are not entered (its model files are large and hold nothing we look for)."""
    found = []
    root_depth = len(root.parts)
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        path = Path(dirpath)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        if MANIFEST_NAME in filenames or len(path.parts) - root_depth >= _MAX_DEPTH:
            dirnames[:] = []
        found.append((path, dirnames, sorted(filenames)))
    return found


def hint_matches(hint: str, path: str | Path) -> bool:
    """Whether `hint` names whole parts of `path`: one folder or file name (`arena-ensemble` names that
    folder, not `arena-ensemble2`), or several consecutive ones written with `/` (`models/ftq`)."""
    wanted = Path(hint).parts
    parts = Path(path).parts
    return bool(wanted) and any(
        parts[i : i + len(wanted)] == wanted for i in range(len(parts) - len(wanted) + 1)
    )


def _pick(kind: str, candidates: list[Path], hint: str | None, root: Path) -> Path:
    if hint:
        matching = [path for path in candidates if hint_matches(hint, path.relative_to(root))]
        if not matching:
            raise UsageError(
                f"no {kind} under {root} matches {hint!r} (whole names in its path: a folder or "
                f"file name, or several as a/b); found: {[str(p) for p in candidates]}"
            )
        candidates = matching
    if len(candidates) > 1:
        raise UsageError(
            f"{len(candidates)} candidates for the {kind} under {root}: {[str(p) for p in candidates]}; "
            "choose one: give its path, or a hint (a folder name in its path)"
        )
    return candidates[0]


def _scan(root: Path, test_names: tuple[str, ...], baseline_name: str) -> dict[str, list[Path]]:
    """Everything `find_inputs` looks for under root, by kind: artifacts, tests, competition_tests (beside a
    sample_submission), wheels, baselines (an artifact's own counts even when another one has the name)."""
    found: dict[str, list[Path]] = {
        kind: [] for kind in ("artifacts", "tests", "competition_tests", "wheels", "baselines")
    }
    for path, _dirs, files in _walk(root):
        if MANIFEST_NAME in files:
            found["artifacts"].append(path)
        for name in test_names:
            if name in files:
                found["tests"].append(path / name)
                if any(file.startswith("sample_submission") for file in files):
                    found["competition_tests"].append(path / name)
        if any(fnmatch.fnmatch(file, WHEEL_GLOB) for file in files):
            found["wheels"].append(path)
        if baseline_name in files:
            found["baselines"].append(path / baseline_name)
    return found


def _input_root(root: str | Path | None) -> Path:
    root = Path(root) if root is not None else default_input_root()
    if not root.is_dir():
        raise UsageError(f"input root {root} is not a directory")
    return root


def find_test_file(
    root: str | Path | None = None,
    test_hint: str | None = None,
    test_names: tuple[str, ...] = ("test.csv", "test.parquet"),
) -> Path:
    """The competition's test file under `root`, chosen as `find_inputs` chooses it (one beside a
    sample_submission.csv wins; a hint names whole folders or files in its path). `run_submission` asks for it
    alone when the artifact cannot be chosen, so the fallback file can still be written."""
    root = _input_root(root)
    found = _scan(root, test_names, "")
    return _pick_test(found, test_hint, root, test_names)


def _pick_test(
    found: dict[str, list[Path]], test_hint: str | None, root: Path, test_names: tuple[str, ...]
) -> Path:
    if not found["tests"]:
        raise UsageError(f"no test file ({' or '.join(test_names)}) under {root}")
    competition = found["competition_tests"]
    return _pick(
        "test file", competition if competition and not test_hint else found["tests"], test_hint, root
    )


def find_inputs(
    root: str | Path | None = None,
    *,
    artifact_hint: str | None = None,
    test_hint: str | None = None,
    artifact_dir: str | Path | None = None,
    test_path: str | Path | None = None,
    test_names: tuple[str, ...] = ("test.csv", "test.parquet"),
    baseline_name: str = "baseline.json",
) -> FoundInputs:
    """Search `root` (default /kaggle/input, else ./data), assuming no mount layout, for the artifact (a
    directory with manifest.json), the test file (one beside sample_submission.csv wins), a wheels folder and
    a baseline. A given `artifact_dir` / `test_path` is used as it is; ambiguity is a UsageError listing the
    candidates, and a hint (`hint_matches`) chooses among them."""
    root = _input_root(root)
    found = _scan(root, test_names, baseline_name)
    artifacts = found["artifacts"]
    if artifact_dir is not None:
        artifact = Path(artifact_dir)
    elif not artifacts:
        raise UsageError(f"no model artifact (a directory with {MANIFEST_NAME}) under {root}")
    else:
        artifact = _pick("artifact", artifacts, artifact_hint, root)
    test = Path(test_path) if test_path is not None else _pick_test(found, test_hint, root, test_names)
    # The baseline is optional: one inside the chosen artifact wins, else a unique one that is inside no
    # artifact; one inside another artifact is never taken; several -> none (logged). (Loading it checks its
    # manifest's sha256, and pickles are never loaded: see baseline.BaselineModel.load.)
    baselines = list(found["baselines"])
    own = artifact / baseline_name
    if own.is_file() and own not in baselines:  # an artifact may carry its baseline inside it
        baselines.append(own)
    inside = [path for path in baselines if artifact in path.parents]
    baselines = [
        path
        for path in baselines
        if artifact in path.parents or not any(other in path.parents for other in artifacts)
    ]
    baseline = inside[0] if inside else baselines[0] if len(baselines) == 1 else None
    if baseline is None and len(baselines) > 1:
        logger.warning(
            "several %s under %s, none chosen: %s", baseline_name, root, [str(p) for p in baselines]
        )
    return FoundInputs(artifact, test, found["wheels"][0] if found["wheels"] else None, baseline)
