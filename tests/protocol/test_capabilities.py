"""Capability names from `/proc/cpuinfo`: the flags devices report and `compression` writes into its reports."""

from __future__ import annotations

from protocol.capabilities import ISA_FLAG_ALIASES, ISA_FLAGS_OF_INTEREST, cpu_features, isa_flags

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


def test_isa_flags_reads_x86_and_arm_cpuinfo_in_list_order() -> None:
    x86 = "processor\t: 0\nflags\t\t: fpu sse4_2 avx2 avx512f avx512_vnni avx_vnni\n"
    arm = "processor\t: 0\nFeatures\t: fp asimd asimdhp asimddp i8mm\n"
    assert isa_flags(x86) == ("sse4_2", "avx2", "avx512f", "avx512_vnni", "avx_vnni")
    assert isa_flags(arm) == ("asimd", "asimdhp", "asimddp", "i8mm")
    assert isa_flags("") == ()


def test_every_alias_names_a_flag_of_interest() -> None:
    assert set(ISA_FLAG_ALIASES) <= set(ISA_FLAGS_OF_INTEREST)
