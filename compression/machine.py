"""The machine a compression run measures on: its CPU model name and the ISA flags that decide variant speed."""

from __future__ import annotations

import platform
from pathlib import Path

from protocol.capabilities import isa_flags

__all__ = ["read_cpu"]


def read_cpu(path: Path = Path("/proc/cpuinfo")) -> tuple[str, tuple[str, ...]]:
    """(CPU model name, ISA flags of interest) of this machine; empty flags where /proc/cpuinfo is absent."""
    try:
        text = path.read_text()
    except OSError:
        return platform.processor() or platform.machine(), ()
    model = next(
        (line.partition(":")[2].strip() for line in text.splitlines() if line.split(":")[0].strip() == "model name"),
        platform.machine(),
    )
    return model, isa_flags(text)
