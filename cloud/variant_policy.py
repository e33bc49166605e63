"""The variant policy: several artifacts of one model version, and the policy that gives each device one.

One version can carry a full-precision ONNX file and its quantized or converted variants (int8 ONNX,
fp16 ONNX, int8 TFLite, ...), each with the runtime it needs, the CPU features that make it fast and
its measured accuracy and latency (from `edgefleet compress`). When the version is deployed, every
device gets the variant `choose_variant` picks from the capabilities the device reported.

The policy, in order (documented in docs/variants.md and tested in tests/cloud/test_variants.py):

1. A device that reported no capabilities (an older agent) gets the primary variant.
2. Only variants whose format one of the device's runtimes loads are candidates (onnx: onnxruntime;
   tflite: litert or tflite_runtime). None → `NoCompatibleVariantError`; the device is not updated.
3. A device with little memory (`memory_mb` at most `LOW_MEMORY_MB`) gets the smallest candidate.
4. Otherwise candidates rank by tier: reduced precision the device accelerates (the variant lists CPU
   features such as avx512_vnni / avx_vnni / asimddp and the device has one of them) → full precision →
   reduced precision without acceleration (emulated int8/fp16 is usually slower than fp32). Within a tier:
   lower measured p50 latency, then higher accuracy, then smaller size, then name.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from pydantic import BaseModel, ConfigDict, Field

from cloud.errors import InvalidInputError
from protocol.capabilities import RUNTIMES_FOR_FORMAT
from protocol.messages import Capabilities, ModelFormat, Name, Sha256Hex, TensorSpec

__all__ = [
    "LOW_MEMORY_MB",
    "ModelVersionLike",
    "NoCompatibleVariantError",
    "Variant",
    "VariantChoice",
    "choose_variant",
    "version_variants",
]

LOW_MEMORY_MB = 512
_FULL_PRECISION = frozenset({"fp32", "float32", "fp64"})


class ModelVersionLike(Protocol):
    """What the policy reads of a registry record (`cloud.models.ModelVersion`)."""

    sha256: str
    size: int
    format: str
    primary_variant: str
    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    variants: list[dict[str, Any]]


class NoCompatibleVariantError(InvalidInputError):
    """No variant of a version can run on a device with the capabilities it reported."""


class Variant(BaseModel):
    """One artifact of a model version, as registered (stored as JSON on the version)."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: Name
    sha256: Sha256Hex
    size: int = Field(ge=0)
    format: ModelFormat
    precision: str = Field(default="fp32", max_length=32)
    runtime: str | None = Field(default=None, max_length=64)
    cpu_features: list[str] = Field(default_factory=list)
    accuracy: float | None = None
    agreement: float | None = None
    latency_p50_ms: float | None = None
    inputs: list[TensorSpec] = Field(min_length=1)
    outputs: list[TensorSpec] = Field(default_factory=list)

    @property
    def full_precision(self) -> bool:
        """True for fp32 (or wider) weights and activations."""
        return self.precision.lower() in _FULL_PRECISION


@dataclass(frozen=True)
class VariantChoice:
    """The variant a device gets, and why (shown in deployments and the fleet summary)."""

    variant: Variant
    reason: str


def choose_variant(
    variants: Sequence[Variant], primary: str, capabilities: Capabilities | dict[str, Any] | None
) -> VariantChoice:
    """Pick the variant a device runs best (see the module docstring for the policy). Pure."""
    by_name = {v.name: v for v in variants}
    if primary not in by_name:
        raise ValueError(f"primary variant {primary!r} is not among {sorted(by_name)}")
    caps = Capabilities.model_validate(capabilities) if isinstance(capabilities, dict) else capabilities
    if caps is None or not caps.runtimes:
        return VariantChoice(by_name[primary], "device reported no runtimes: primary variant")
    runtimes = set(caps.runtimes)
    runnable = [v for v in variants if RUNTIMES_FOR_FORMAT.get(v.format, frozenset()) & runtimes]
    if not runnable:
        needs = sorted({f"{v.format.value} ({'/'.join(sorted(RUNTIMES_FOR_FORMAT[v.format]))})" for v in variants})
        raise NoCompatibleVariantError(
            f"no variant runs on a device with runtimes {sorted(runtimes)}; variants need {', '.join(needs)}",
            field="capabilities.runtimes",
        )
    if caps.memory_mb is not None and caps.memory_mb <= LOW_MEMORY_MB:
        smallest = min(runnable, key=lambda v: (v.size, v.name))
        return VariantChoice(smallest, f"low memory ({caps.memory_mb} MB): smallest runnable variant")
    features = set(caps.cpu_features)
    best = min(runnable, key=lambda v: _rank(v, features))
    tier = _tier(best, features)
    reason = {
        0: f"{best.precision} accelerated by {', '.join(sorted(set(best.cpu_features) & features))}",
        1: "full precision: no accelerated reduced-precision variant for this CPU",
        2: "only reduced-precision variants without CPU acceleration run here",
    }[tier]
    return VariantChoice(best, reason)


def _tier(variant: Variant, features: set[str]) -> int:
    if variant.full_precision:
        return 1
    return 0 if set(variant.cpu_features) & features else 2


def _rank(variant: Variant, features: set[str]) -> tuple[int, float, float, int, str]:
    latency = variant.latency_p50_ms if variant.latency_p50_ms is not None else float("inf")
    accuracy = -(variant.accuracy if variant.accuracy is not None else 0.0)
    return (_tier(variant, features), latency, accuracy, variant.size, variant.name)


def version_variants(record: ModelVersionLike) -> list[Variant]:
    """Every variant of a version: its primary artifact first, then the registered variants. Pure."""
    primary = Variant(
        name=record.primary_variant,
        sha256=record.sha256,
        size=record.size,
        format=ModelFormat(record.format),
        precision="fp32",
        runtime=None,
        inputs=[TensorSpec.model_validate(t) for t in record.inputs],
        outputs=[TensorSpec.model_validate(t) for t in record.outputs],
    )
    return [primary, *(Variant.model_validate(v) for v in record.variants)]
