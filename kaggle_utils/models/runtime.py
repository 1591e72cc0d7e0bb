"""Which accelerator this process has, the compute dtype to use on it, and where a Kaggle run's inputs are.

Kaggle offers 2x T4 (compute capability 7.5: no native bf16; `torch.cuda.is_bf16_supported()` says True there
through emulation, which ran Gemma-2 about twice as slow), TPU v3-8 / v5e-8 (torch_xla) and CPU. Detection is
the default; every choice can be forced through `InferenceConfig` (device, num_gpus, compute_dtype).
The hardware probe is a plain function argument so the decision logic is tested without the hardware.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import logging
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Literal

import torch

from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.devices import DTYPES
from kaggle_utils.quant.layout import MANIFEST_NAME

logger = logging.getLogger(__name__)
DeviceKind = Literal["cuda", "tpu", "cpu"]
# bf16 tensor cores arrive with Ampere (8.0); below it bf16 is emulated.
_NATIVE_BF16_CAPABILITY = (8, 0)


@dataclass(frozen=True)
class GpuInfo:
    index: int
    name: str
    capability: tuple[int, int]
    total_memory_gb: float
    native_bf16: bool


@dataclass(frozen=True)
class HardwareProbe:
    """What the machine has, as seen by torch (and whether torch_xla can be imported)."""

    gpus: tuple[GpuInfo, ...] = ()
    tpu_available: bool = False
    cpu_threads: int = 1


@dataclass(frozen=True)
class Runtime:
    """The devices inference runs on (one model replica each) and the compute dtype."""

    kind: DeviceKind
    devices: tuple[str, ...]
    compute_dtype: torch.dtype
    gpus: tuple[GpuInfo, ...] = field(default=())
    reason: str = ""

    @property
    def num_replicas(self) -> int:
        return len(self.devices)

    def describe(self) -> str:
        if self.kind == "cuda":
            names = ", ".join(f"{gpu.name} (cc {gpu.capability[0]}.{gpu.capability[1]})" for gpu in self.gpus)
            hardware = f"{len(self.devices)}x CUDA [{names}]"
        elif self.kind == "tpu":
            hardware = "TPU (torch_xla)"
        else:
            hardware = "CPU"
        return f"{hardware}, compute {str(self.compute_dtype).removeprefix('torch.')}; {self.reason}"

    def to_dict(self) -> dict:
        return {
            "kind": self.kind,
            "devices": list(self.devices),
            "compute_dtype": str(self.compute_dtype).removeprefix("torch."),
            "gpus": [asdict(gpu) for gpu in self.gpus],
            "reason": self.reason,
            "description": self.describe(),
        }


def probe_hardware() -> HardwareProbe:
    """Ask torch what is there. `including_emulation=False` gives the hardware bf16 answer (False on a T4)."""
    gpus: list[GpuInfo] = []
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            capability = (props.major, props.minor)
            with torch.cuda.device(index):
                native = bool(torch.cuda.is_bf16_supported(including_emulation=False))
            gpus.append(GpuInfo(index, props.name, capability, round(props.total_memory / 2**30, 1), native))
    tpu = importlib.util.find_spec("torch_xla") is not None
    return HardwareProbe(gpus=tuple(gpus), tpu_available=tpu, cpu_threads=torch.get_num_threads())


def detect_runtime(
    cfg: InferenceConfig | None = None, probe: HardwareProbe | Callable[[], HardwareProbe] | None = None
) -> Runtime:
    """Pick device kind, devices and compute dtype: the config's explicit choices win, detection fills the rest.

    auto: CUDA if any GPU, else TPU if torch_xla imports, else CPU. Compute dtype on CUDA: bf16 only when every
    used GPU has it natively (cc >= 8.0), else fp16 (T4); TPU: bf16; CPU: fp32 (bnb CPU kernels and the tiny test
    models are exact there).
    """
    cfg = cfg or InferenceConfig()
    if probe is None:
        probe = probe_hardware()
    elif callable(probe):
        probe = probe()

    kind = cfg.device
    if kind == "auto":
        kind = "cuda" if probe.gpus else "tpu" if probe.tpu_available else "cpu"
        reason = "detected"
    else:
        reason = f"device={kind} from config"
    if kind == "cuda" and not probe.gpus:
        raise UsageError("inference device 'cuda' was requested but torch sees no CUDA GPU")
    if kind == "tpu" and not probe.tpu_available:
        raise UsageError("inference device 'tpu' was requested but torch_xla is not importable")

    gpus: tuple[GpuInfo, ...] = ()
    if kind == "cuda":
        wanted = cfg.num_gpus if cfg.num_gpus is not None else len(probe.gpus)
        if not 1 <= wanted <= len(probe.gpus):
            raise UsageError(
                f"inference num_gpus={cfg.num_gpus} but {len(probe.gpus)} CUDA GPU(s) are visible"
            )
        gpus = probe.gpus[:wanted]
        devices = tuple(f"cuda:{gpu.index}" for gpu in gpus)
    elif kind == "tpu":
        devices = ("xla",)
    else:
        devices = ("cpu",) * max(1, cfg.cpu_replicas)  # several replicas: CPU stand-ins for several GPUs

    if cfg.compute_dtype != "auto":
        dtype = DTYPES[cfg.compute_dtype]
        reason += f", compute_dtype={cfg.compute_dtype} from config"
    elif kind == "cuda":
        native = all(gpu.native_bf16 for gpu in gpus)
        dtype = torch.bfloat16 if native else torch.float16
        lowest = min(gpu.capability for gpu in gpus)
        reason += (
            ", bf16 native"
            if native
            else f", fp16 because cc {lowest[0]}.{lowest[1]} < 8.0 has no native bf16"
        )
    elif kind == "tpu":
        dtype = torch.bfloat16
        reason += ", bf16 on TPU"
    else:
        dtype = torch.float32
        reason += ", fp32 on CPU"
    return Runtime(kind=kind, devices=devices, compute_dtype=dtype, gpus=gpus, reason=reason)


def native_bf16_for(capability: tuple[int, int]) -> bool:
    """The capability rule, for probes built by hand (tests, benchmarks projecting to a T4)."""
    return tuple(capability) >= _NATIVE_BF16_CAPABILITY


# ----------------------------------------------------------------------------------------------------------
# Where the notebook runs, and where its inputs are
# ----------------------------------------------------------------------------------------------------------

KAGGLE_INPUT = Path("/kaggle/input")
KAGGLE_WORKING = Path("/kaggle/working")
WHEEL_GLOB = "kaggle_utils-*.whl"
_MAX_DEPTH = 8


def cpu_model() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what `platform` knows: for benchmark and report records."""
    import platform

    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def total_memory_gb() -> float | None:
    """Total RAM in GB (Linux /proc/meminfo), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None


def on_kaggle() -> bool:
    """Inside a Kaggle kernel (interactive, commit or the competition rerun)."""
    return bool(os.environ.get("KAGGLE_KERNEL_RUN_TYPE")) or KAGGLE_WORKING.is_dir()


def is_competition_rerun() -> bool:
    """Kaggle sets KAGGLE_IS_COMPETITION_RERUN in the scoring rerun (the hidden ~25k-row test set)."""
    return bool(os.environ.get("KAGGLE_IS_COMPETITION_RERUN"))


# The Hugging Face libraries' offline switches. bitsandbytes' CPU backend asks the Hub for a kernel on every
# import (CPUs with AVX512-BF16), and transformers / datasets may look up a name there: the package never
# downloads from the Hub (every load is `local_files_only`), so it runs with these set.
OFFLINE_ENV: dict[str, str] = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def use_offline_hub() -> list[str]:
    """Set each variable of `OFFLINE_ENV` the user has not set (a user's own value, "0" included, is kept);
    returns the names set. huggingface_hub reads HF_HUB_OFFLINE once, when it is imported: when it already is,
    its `constants.HF_HUB_OFFLINE` (what its requests check) is switched on too, unless the user set the
    variable. Called at CLI start (before the libraries are imported), by `predict` and `run_submission`; the
    notebooks set the same variables in their first cell."""
    user_set = {name for name in OFFLINE_ENV if name in os.environ}
    for name, value in OFFLINE_ENV.items():
        os.environ.setdefault(name, value)
    hub = sys.modules.get("huggingface_hub.constants")
    if hub is not None and "HF_HUB_OFFLINE" not in user_set and "TRANSFORMERS_OFFLINE" not in user_set:
        hub.HF_HUB_OFFLINE = True
    return [name for name in OFFLINE_ENV if name not in user_set]


def default_input_root() -> Path:
    return KAGGLE_INPUT if KAGGLE_INPUT.is_dir() else Path("data")


def run_output_dir(name: str, out_dir: str | Path | None = None) -> Path:
    """`out_dir` when given, else /kaggle/working/<name> on Kaggle (kept as the kernel's output), else
    runs/<name>."""
    if out_dir:
        return Path(out_dir)
    return (KAGGLE_WORKING if on_kaggle() else Path("runs")) / name


def find_competition_file(competition: str, name: str = "train.csv", local_dir: str | Path = "data") -> Path:
    """A competition's file: /kaggle/input/<slug>/<name> or /kaggle/input/competitions/<slug>/<name> (Kaggle
    images mount competitions either way), else <local_dir>/<name> outside Kaggle. A missing file is a
    UsageError listing the places looked at."""
    candidates = [
        KAGGLE_INPUT / competition / name,
        KAGGLE_INPUT / "competitions" / competition / name,
        Path(local_dir) / name,
    ]
    for path in candidates:
        if path.is_file():
            return path
    raise UsageError(f"no {name} in {[str(path) for path in candidates]}")


def default_submission_path() -> Path:
    """/kaggle/working/submission.csv on Kaggle (the only place it is scored), else submissions/submission.csv."""
    return KAGGLE_WORKING / "submission.csv" if on_kaggle() else Path("submissions") / "submission.csv"


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
    """Whether `hint` names whole parts of `path`: one folder or file name (`arena-ensemble` names that folder,
    not `arena-ensemble2`), or several consecutive ones written with `/` (`models/ftq`)."""
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
    """Search `root` (default /kaggle/input, else ./data) for the artifact (a directory with manifest.json),
    the competition's test file, an attached wheels folder and a baseline model file.

    Mounts differ between Kaggle images (/kaggle/input/<slug>/ or /kaggle/input/competitions/<slug>/, datasets
    and models nested by owner and version), so nothing is assumed about the layout. A test file beside a
    sample_submission.csv (a competition folder) wins over other files of that name. A given `artifact_dir` or
    `test_path` is taken as it is and not searched for (so two attached artifacts are no ambiguity when one is
    named). Ambiguity raises a UsageError listing the candidates; a hint chooses: whole names in the path (a
    folder or file name, or consecutive ones as a/b; `arena-ensemble` does not choose `arena-ensemble2`).
    """
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
