"""What the benchmark scripts write next to their figures about the machine they ran on."""

from __future__ import annotations

import platform
from pathlib import Path


def cpu_name() -> str:
    """The CPU's model name (from /proc/cpuinfo where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_family_model() -> str:
    """The CPU's family, model and stepping numbers from /proc/cpuinfo ("family 25, model 17, stepping 0"): the
    model name alone can be generic on a virtual machine ("AMD EPYC"), while these numbers tell the
    microarchitecture (AMD family 25 is Zen 3/4, 26 Zen 5; Intel family 6 with its model number)."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip()
            if key in ("cpu family", "model", "stepping") and key not in fields:
                fields[key] = value.strip()
            if not line.strip() and fields:  # the first processor's block is enough
                break
    except OSError:
        pass
    if not fields:
        return "family/model unknown"
    return ", ".join(f"{'family' if key == 'cpu family' else key} {fields[key]}"
                     for key in ("cpu family", "model", "stepping") if key in fields)
