"""Gate evaluation: the updated cohort against the control cohort or absolute limits, one verdict per enabled gate.

Each gate returns *passed*, *failed* or *insufficient_data* with the observed figure, the threshold
and a sentence a human can read in the rollout's log; a gate that compares with the control cohort is
*not_applicable* under an absolute baseline (a new model has no control cohort). A gate never passes on
too little data.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from enum import StrEnum
from typing import Annotated, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from cloud.rollouts.plan import Baseline, GateThresholds
from cloud.rollouts.stats import (
    error_rate,
    jensen_shannon_divergence,
    p95_latency_ms,
    p95_ratio,
    population_stability_index,
    psi_band,
)
from protocol.messages import TelemetryWindow
from protocol.telemetry import LATENCY_BUCKETS_MS, merge_histograms

__all__ = [
    "COMPARATIVE_GATES",
    "NO_MODEL",
    "CohortStats",
    "GateReport",
    "GateResult",
    "GateVerdict",
    "control_mismatch",
    "describe_runs",
    "evaluate_gates",
]

# The key of `CohortStats.runs` for devices that serve no model.
NO_MODEL = "none"

_Count = Annotated[int, Field(ge=0)]


class CohortStats(BaseModel):
    """What a group of devices did: installs, inferences, errors, latency histogram, predicted classes.

    The engine fills `install_attempts` / `install_failures` of the updated cohort itself: devices of the
    current wave, and those of them that gave up after their retries. `runs` says what the cohort's devices
    serve (`model:version`, or `none`, → devices), so a control cohort on another model can be named.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    devices: _Count = 0
    install_attempts: _Count = 0
    install_failures: _Count = 0
    inference_count: _Count = 0
    error_count: _Count = 0
    latency_histogram: list[_Count] = Field(default_factory=list)
    class_counts: dict[str, _Count] = Field(default_factory=dict)
    runs: dict[str, _Count] = Field(default_factory=dict)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.install_failures > self.install_attempts:
            raise ValueError(
                f"install_failures {self.install_failures} exceed install_attempts {self.install_attempts}"
            )
        if self.error_count > self.inference_count:
            raise ValueError(f"error_count {self.error_count} exceeds inference_count {self.inference_count}")
        if self.latency_histogram and len(self.latency_histogram) != len(LATENCY_BUCKETS_MS) + 1:
            raise ValueError(
                f"latency_histogram has {len(self.latency_histogram)} buckets, "
                f"protocol.telemetry.LATENCY_BUCKETS_MS needs {len(LATENCY_BUCKETS_MS) + 1}"
            )
        return self

    @classmethod
    def from_windows(cls, windows: Iterable[TelemetryWindow], *, devices: int = 0) -> CohortStats:
        """Sum telemetry windows (already deduplicated by `(device_id, seq)`) into cohort figures."""
        windows = list(windows)
        classes: dict[str, int] = {}
        for window in windows:
            for name, n in window.class_counts.items():
                classes[name] = classes.get(name, 0) + n
        return cls(
            devices=devices or len({w.device_id for w in windows}),
            inference_count=sum(w.inference_count for w in windows),
            error_count=sum(w.error_count for w in windows),
            latency_histogram=merge_histograms(w.latency_histogram for w in windows),
            class_counts=classes,
        )

    @property
    def latency_samples(self) -> int:
        """How many latencies the histogram holds."""
        return sum(self.latency_histogram)

    @property
    def class_samples(self) -> int:
        """How many predictions the class counts hold."""
        return sum(self.class_counts.values())


class GateVerdict(StrEnum):
    """Outcome of one gate."""

    PASSED = "passed"
    FAILED = "failed"
    INSUFFICIENT_DATA = "insufficient_data"
    NOT_APPLICABLE = "not_applicable"


class GateResult(BaseModel):
    """One gate's verdict with its figures."""

    model_config = ConfigDict(frozen=True)

    name: str
    verdict: GateVerdict
    observed: float | None
    threshold: float
    reason: str


class GateReport(BaseModel):
    """All gate verdicts of one evaluation."""

    model_config = ConfigDict(frozen=True)

    results: list[GateResult] = Field(default_factory=list)

    @property
    def failed(self) -> list[GateResult]:
        """Gates that failed."""
        return [r for r in self.results if r.verdict is GateVerdict.FAILED]

    @property
    def undecided(self) -> list[GateResult]:
        """Gates without enough data to decide."""
        return [r for r in self.results if r.verdict is GateVerdict.INSUFFICIENT_DATA]

    @property
    def passed(self) -> bool:
        """Every enabled gate passed or does not apply (an empty report passes: no gate is enabled)."""
        return all(r.verdict in {GateVerdict.PASSED, GateVerdict.NOT_APPLICABLE} for r in self.results)

    def summary(self) -> str:
        """One line per gate, e.g. `p95_latency_ratio: failed — 2.00 > 1.25 (...)`."""
        return "; ".join(f"{r.name}: {r.verdict.value} — {r.reason}" for r in self.results)


def _insufficient(name: str, threshold: float, why: str) -> GateResult:
    return GateResult(name=name, verdict=GateVerdict.INSUFFICIENT_DATA, observed=None, threshold=threshold, reason=why)


def _compare(name: str, observed: float, threshold: float, detail: str) -> GateResult:
    ok = observed <= threshold
    relation = "≤" if ok else ">"
    return GateResult(
        name=name,
        verdict=GateVerdict.PASSED if ok else GateVerdict.FAILED,
        observed=observed,
        threshold=threshold,
        reason=f"{observed:.4g} {relation} {threshold:.4g} ({detail})",
    )


def describe_runs(runs: dict[str, int]) -> str:
    """`mnist:1.0 on 4 devices, no model on 2`: what a cohort's devices serve, most common first."""
    parts = []
    for key, n in sorted(runs.items(), key=lambda item: (-item[1], item[0])):
        what = "no model" if key == NO_MODEL else key
        parts.append(f"{what} on {n} device{'s' if n != 1 else ''}")
    return ", ".join(parts) or "nothing known"


def _too_few(
    what: str, minimum: int, wave: int, control: int | None = None, runs: dict[str, int] | None = None
) -> str | None:
    """Why there is too little data, or None when both cohorts have at least `minimum`."""
    if wave < minimum:
        return f"updated cohort has {wave} {what}, needs {minimum}"
    if control is not None and control < minimum:
        serving = f" (its devices serve {describe_runs(runs)})" if runs else ""
        return f"control cohort has {control} {what}, needs {minimum}{serving}"
    return None


def _absolute_error_gate(g: GateThresholds, threshold: float, wave: CohortStats, control: CohortStats) -> GateResult:
    name = "error_rate"
    if why := _too_few("inferences", g.min_inferences, wave.inference_count):
        return _insufficient(name, threshold, why)
    rate = error_rate(wave.error_count, wave.inference_count)
    return _compare(name, rate, threshold, f"{wave.error_count} errors in {wave.inference_count} inferences")


def _absolute_latency_gate(g: GateThresholds, threshold: float, wave: CohortStats, control: CohortStats) -> GateResult:
    name = "p95_latency_ms"
    if why := _too_few("latency samples", g.min_inferences, wave.latency_samples):
        return _insufficient(name, threshold, why)
    p95 = p95_latency_ms([wave.latency_histogram])
    return _compare(name, p95, threshold, f"p95 of {wave.latency_samples} inferences, bucket upper bound")


def _install_gate(g: GateThresholds, threshold: float, wave: CohortStats, control: CohortStats) -> GateResult:
    name = "install_failure_rate"
    if why := _too_few("installs", g.min_installs, wave.install_attempts):
        return _insufficient(name, threshold, why)
    rate = wave.install_failures / wave.install_attempts
    return _compare(name, rate, threshold, f"{wave.install_failures} of {wave.install_attempts} installs failed")


def _error_gate(g: GateThresholds, threshold: float, wave: CohortStats, control: CohortStats) -> GateResult:
    name = "error_rate_increase"
    if why := _too_few("inferences", g.min_inferences, wave.inference_count, control.inference_count, control.runs):
        return _insufficient(name, threshold, why)
    ours, theirs = (
        error_rate(wave.error_count, wave.inference_count),
        error_rate(control.error_count, control.inference_count),
    )
    return _compare(name, ours - theirs, threshold, f"error rate {ours:.2%} vs control {theirs:.2%}")


def _latency_gate(g: GateThresholds, threshold: float, wave: CohortStats, control: CohortStats) -> GateResult:
    name = "p95_latency_ratio"
    if why := _too_few(
        "latency samples", g.min_inferences, wave.latency_samples, control.latency_samples, control.runs
    ):
        return _insufficient(name, threshold, why)
    ours, theirs = p95_latency_ms([wave.latency_histogram]), p95_latency_ms([control.latency_histogram])
    ratio = p95_ratio(wave.latency_histogram, control.latency_histogram)
    return _compare(name, ratio, threshold, f"p95 {ours:g} ms vs control {theirs:g} ms")


def _psi_gate(g: GateThresholds, threshold: float, wave: CohortStats, control: CohortStats) -> GateResult:
    name = "class_shift_psi"
    if why := _too_few("predictions", g.min_class_samples, wave.class_samples, control.class_samples, control.runs):
        return _insufficient(name, threshold, why)
    psi = population_stability_index(control.class_counts, wave.class_counts)
    return _compare(
        name, psi, threshold, f"{psi_band(psi)} over {len(wave.class_counts | control.class_counts)} classes"
    )


def _js_gate(g: GateThresholds, threshold: float, wave: CohortStats, control: CohortStats) -> GateResult:
    name = "class_shift_js"
    if why := _too_few("predictions", g.min_class_samples, wave.class_samples, control.class_samples, control.runs):
        return _insufficient(name, threshold, why)
    jsd = jensen_shannon_divergence(control.class_counts, wave.class_counts)
    return _compare(name, jsd, threshold, "Jensen-Shannon divergence, base 2")


_Gate = Callable[[GateThresholds, float, CohortStats, CohortStats], GateResult]

# Threshold field → (gate name, gate, whether it compares with the control cohort), in the order reports list them.
_GATES: tuple[tuple[str, str, _Gate, bool], ...] = (
    ("max_install_failure_rate", "install_failure_rate", _install_gate, False),
    ("max_error_rate", "error_rate", _absolute_error_gate, False),
    ("max_error_rate_increase", "error_rate_increase", _error_gate, True),
    ("max_p95_ms", "p95_latency_ms", _absolute_latency_gate, False),
    ("max_p95_latency_ratio", "p95_latency_ratio", _latency_gate, True),
    ("max_psi", "class_shift_psi", _psi_gate, True),
    ("max_js_divergence", "class_shift_js", _js_gate, True),
)
COMPARATIVE_GATES = frozenset(name for _, name, _, compares in _GATES if compares)


def evaluate_gates(
    gates: GateThresholds, wave_cohort: CohortStats, control: CohortStats, *, baseline: Baseline = "control"
) -> GateReport:
    """Evaluate every enabled gate of `gates` on the updated cohort, against the control cohort or absolute limits.

    Under `baseline="absolute"` the gates that compare with the control cohort are reported as
    `not_applicable` and never waited for.
    """
    results = []
    for field, name, gate, compares in _GATES:
        threshold = getattr(gates, field)
        if threshold is None:
            continue
        if compares and baseline == "absolute":
            results.append(
                GateResult(
                    name=name,
                    verdict=GateVerdict.NOT_APPLICABLE,
                    observed=None,
                    threshold=float(threshold),
                    reason="baseline is absolute: no control cohort to compare with",
                )
            )
        else:
            results.append(gate(gates, float(threshold), wave_cohort, control))
    return GateReport(results=results)


def control_mismatch(control: CohortStats, *, model: str, version: str | None, target: str) -> str | None:
    """Why the control cohort cannot be compared with, or None when some of its devices serve what it should.

    It should serve `model:version` (the plan's previous version), or any version of `model` but the target
    when the plan names none. Says nothing when what the devices serve is unknown (`runs` empty).
    """
    expected = f"{model}:{version}" if version is not None else f"{model} (a version other than {target})"
    if control.devices == 0:
        return f"there is no control cohort: no selected device was seen untouched, serving {expected}"
    if not control.runs:
        return None
    if version is not None:
        usable = control.runs.get(f"{model}:{version}", 0)
    else:
        usable = sum(n for key, n in control.runs.items() if key.startswith(f"{model}:") and key != f"{model}:{target}")
    if usable:
        return None
    return f"the control cohort serves {describe_runs(control.runs)}, not {expected}"
