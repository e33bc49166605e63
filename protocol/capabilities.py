"""Capability names both sides agree on: the CPU flags that decide which variant runs fast, and runtimes per format.

A device reports its flags and runtimes (`protocol.Capabilities`); the coordinator's variant policy and
`edgefleet compress` read the same names, so a device, a benchmark and a policy never disagree on spelling.
"""

from __future__ import annotations

from protocol.messages import ModelFormat

__all__ = ["ISA_FLAGS_OF_INTEREST", "ISA_FLAG_ALIASES", "RUNTIMES_FOR_FORMAT", "cpu_features", "isa_flags"]

# Flags that decide how fast int8 / fp16 kernels run (x86 VNNI/AMX, ARM dot product / i8mm / fp16).
ISA_FLAGS_OF_INTEREST: tuple[str, ...] = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_int8",
    "amx_bf16",
    "neon",
    "asimd",
    "asimdhp",
    "asimddp",
    "i8mm",
    "sve",
)

# Also reported under the names people search for: Arm's dot product and half-precision extensions.
ISA_FLAG_ALIASES: dict[str, str] = {"asimddp": "dotprod", "asimdhp": "fp16"}

# Runtime names (as devices report them, without versions) that load each model format.
RUNTIMES_FOR_FORMAT: dict[ModelFormat, frozenset[str]] = {
    ModelFormat.ONNX: frozenset({"onnxruntime"}),
    ModelFormat.TFLITE: frozenset({"litert", "tflite_runtime"}),
}


def isa_flags(cpuinfo: str) -> tuple[str, ...]:
    """The flags of interest present in `/proc/cpuinfo` text (x86 `flags` or ARM `Features`), in list order."""
    present: set[str] = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            present.update(value.split())
    return tuple(flag for flag in ISA_FLAGS_OF_INTEREST if flag in present)


def cpu_features(cpuinfo: str) -> list[str]:
    """The flags of interest in a `/proc/cpuinfo` text, sorted, with their aliases (what a device reports)."""
    features = set(isa_flags(cpuinfo))
    features.update(alias for flag, alias in ISA_FLAG_ALIASES.items() if flag in features)
    return sorted(features)
