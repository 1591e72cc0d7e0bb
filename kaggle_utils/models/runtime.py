"""Which accelerator this process has (CUDA, TPU via torch_xla, CPU) and the compute dtype to use on it.

Detection is the default; `InferenceConfig` (device, num_gpus, compute_dtype) forces any choice, and the
hardware probe is an argument so the logic is tested without hardware. Usage: `detect_runtime(cfg).devices`.
"""

from __future__ import annotations

import importlib.util
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Literal

import torch

from kaggle_utils.core.config import InferenceConfig
from kaggle_utils.core.errors import UsageError
from kaggle_utils.models.devices import DTYPES

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
    """Pick device kind, devices and compute dtype: the config's explicit choices win, detection the rest
    (CUDA, else TPU, else CPU; bf16 only where every used GPU has it natively, fp16 on T4, fp32 on CPU)."""
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

    dtype, dtype_reason = _compute_dtype(cfg, kind, gpus)
    return Runtime(kind=kind, devices=devices, compute_dtype=dtype, gpus=gpus, reason=reason + dtype_reason)


def _compute_dtype(cfg: InferenceConfig, kind: str, gpus: tuple[GpuInfo, ...]) -> tuple[torch.dtype, str]:
    """The compute dtype for `kind` and the reason text appended to `Runtime.reason`."""
    reason = ""
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
    return dtype, reason


def native_bf16_for(capability: tuple[int, int]) -> bool:
    """The capability rule, for probes built by hand (tests, benchmarks projecting to a T4)."""
    return tuple(capability) >= _NATIVE_BF16_CAPABILITY


# ----------------------------------------------------------------------------------------------------------
# Where the notebook runs, and where its inputs are
# ----------------------------------------------------------------------------------------------------------
