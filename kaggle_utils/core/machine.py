"""What machine made a figure: the CPU's model name and core count, for reports and recorded figures.

from kaggle_utils.core.machine import describe_machine
describe_machine()  # {"cpu": "AMD EPYC", "cores": 2}
"""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (Linux: /proc/cpuinfo's `model name`), else what `platform` knows."""
    fallback = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            return next(
                (line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), fallback
            )
    except OSError:
        return fallback


def describe_machine() -> dict:
    """{"cpu": model name, "cores": logical cores} of this machine."""
    return {"cpu": cpu_name(), "cores": os.cpu_count()}


def total_memory_gb() -> float | None:
    """Total RAM in GB (Linux /proc/meminfo), or None where it cannot be read."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024**2, 1)
    except (OSError, ValueError, IndexError):
        pass
    return None
