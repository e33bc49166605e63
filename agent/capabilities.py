"""What this device can run, for `ReportedState.capabilities`: runtimes, CPU arch and ISA flags, memory.

The ISA flags are the ones that decide which compressed variant runs fast here (int8 dot products,
fp16 arithmetic, wide vectors), read from `/proc/cpuinfo` (`flags` on x86, `Features` on Arm) and named
by `protocol.capabilities`, the list `compression` and the coordinator's variant policy use too.
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from agent.runtime import RuntimeCatalog
from protocol import Capabilities
from protocol.capabilities import cpu_features

__all__ = ["device_capabilities"]


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # not Linux, or no procfs in this container: no flags rather than no report
        return ""


def device_capabilities(catalog: RuntimeCatalog) -> Capabilities:
    """Runtime names of `catalog` (without versions), CPU architecture and ISA flags, memory (MB) and OS."""
    memory_mb = None
    with contextlib.suppress(AttributeError, ValueError, OSError):  # not every OS reports physical memory
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return Capabilities(
        # Bare names, as docs/protocol.md and the coordinator's variant policy expect (`onnxruntime`, `litert`).
        runtimes=list(dict.fromkeys(name.partition("-")[0] for name in catalog.names())),
        arch=platform.machine(),
        cpu_features=cpu_features(_read_cpuinfo()),
        memory_mb=memory_mb,
        os=platform.system().lower(),
    )
