"""What machine made a figure: the CPU's model name and core count, for reports and recorded figures.

from kaggle_utils.core.machine import describe_machine
describe_machine()  # {"cpu": "AMD EPYC", "cores": 2}
"""

from __future__ import annotations

import os
import platform


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
