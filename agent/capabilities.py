"""What this device can run, for `ReportedState.capabilities`: runtimes, CPU arch and ISA flags, memory.

The ISA flags are the ones that decide which compressed variant runs fast here (int8 dot products,
fp16 arithmetic, wide vectors), read from `/proc/cpuinfo` (`flags` on x86, `Features` on Arm).
"""

from __future__ import annotations

import contextlib
import os
import platform
from pathlib import Path

from agent.runtime import RuntimeRegistry
from protocol import Capabilities

__all__ = ["INTERESTING_FLAGS", "cpu_features", "device_capabilities"]

# Flags named as the kernel names them; `neon`/`asimd` (Arm SIMD), `asimddp` (dotprod), `asimdhp` (fp16).
INTERESTING_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "avx_vnni",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "asimddp",
    "asimdhp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
)
_ALIASES = {"asimddp": "dotprod", "asimdhp": "fp16"}  # also reported under their common names


def cpu_features(cpuinfo: str) -> list[str]:
    """The interesting ISA flags in a `/proc/cpuinfo` text (first CPU), sorted; common aliases added."""
    found: set[str] = set()
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            found.update(value.split())
            break  # every core of a device reports the same flags (big.LITTLE cores share the ISA)
    features = {flag for flag in INTERESTING_FLAGS if flag in found}
    features.update(alias for flag, alias in _ALIASES.items() if flag in features)
    return sorted(features)


def _read_cpuinfo(path: Path = Path("/proc/cpuinfo")) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:  # not Linux, or no procfs in this container: no flags rather than no report
        return ""


def device_capabilities(registry: RuntimeRegistry) -> Capabilities:
    """Runtimes of `registry`, CPU architecture and ISA flags, physical memory (MB) and OS."""
    memory_mb = None
    with contextlib.suppress(AttributeError, ValueError, OSError):  # not every OS reports physical memory
        memory_mb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // (1024 * 1024)
    return Capabilities(
        runtimes=registry.names(),
        arch=platform.machine(),
        cpu_features=cpu_features(_read_cpuinfo()),
        memory_mb=memory_mb,
        os=platform.system().lower(),
    )
