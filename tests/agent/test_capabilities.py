"""Device capabilities: ISA flags from /proc/cpuinfo (x86 and Arm), runtimes, memory."""

from __future__ import annotations

from agent.capabilities import cpu_features, device_capabilities
from agent.runtime import default_registry

X86 = """processor\t: 0
vendor_id\t: GenuineIntel
flags\t\t: fpu vme sse4_2 avx avx2 fma f16c avx512f avx512_vnni avx_vnni amx_int8 hypervisor
processor\t: 1
flags\t\t: fpu
"""
ARM = """processor\t: 0
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm asimddp i8mm
CPU implementer\t: 0x41
"""


def test_x86_flags_of_the_first_cpu_are_reported() -> None:
    assert cpu_features(X86) == [
        "amx_int8",
        "avx",
        "avx2",
        "avx512_vnni",
        "avx512f",
        "avx_vnni",
        "f16c",
        "fma",
        "sse4_2",
    ]


def test_arm_features_are_reported_with_their_common_names() -> None:
    assert cpu_features(ARM) == ["asimd", "asimddp", "asimdhp", "dotprod", "fp16", "i8mm"]


def test_no_cpuinfo_means_no_flags_not_an_error() -> None:
    assert cpu_features("") == []


def test_capabilities_of_this_device() -> None:
    caps = device_capabilities(default_registry())
    assert "onnxruntime" in caps.runtimes  # bare names: what the coordinator's variant policy matches
    assert all("-" not in r for r in caps.runtimes)
    assert caps.arch and caps.os and (caps.memory_mb or 0) > 0
    assert caps.cpu_features == sorted(caps.cpu_features)
