"""A rollout plan: which devices, in which waves, under which gates, and what to do when a gate fails.

Plans are pure data (pydantic v2) validated up front, so a bad plan is refused with a message that
names the field before any device is touched. Device selection and wave assignment are deterministic
functions of `(rollout_id, device_id)`: a restarted coordinator picks exactly the same devices.
"""

from __future__ import annotations

import hashlib
import itertools
import math
from collections.abc import Iterable, Mapping
from typing import Annotated, Any, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, model_validator

__all__ = [
    "HELD_FOR_PROMOTION",
    "Baseline",
    "GateThresholds",
    "RolloutPlan",
    "Selector",
    "Wave",
    "assign_waves",
    "default_waves",
    "promotion_target",
    "stable_fraction",
    "wave_targets",
]

Name = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")]
Version = Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9][A-Za-z0-9.+_-]{0,63}$")]
# The reason a rollout paused by its plan's `hold_after_waves` carries (what a status page or the CT loop reads).
HELD_FOR_PROMOTION = "held for a person's promotion (hold_after_waves)"
# What the gates judge the updated cohort against: the control cohort, or the plan's absolute limits.
Baseline = Literal["control", "absolute"]


class _Spec(BaseModel):
    """Part of a plan: immutable, unknown fields refused (a typo must not silently disable a gate)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


def stable_fraction(rollout_id: str, purpose: str, device_id: str) -> float:
    """A number in [0, 1) fixed by `(rollout_id, purpose, device_id)`: the same on every run and machine."""
    digest = hashlib.sha256(f"{rollout_id}\x00{purpose}\x00{device_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


class Selector(_Spec):
    """Which devices a rollout targets.

    A device matches when its id is in `device_ids` or its tags contain every `tags` pair (with both
    empty, every device of the fleet matches). Of the matching group, a device is selected when
    `stable_fraction(rollout_id, "select", device_id) < percent / 100`: a stable, per-device draw, so
    the same devices stay selected across restarts and a late joiner is drawn like everyone else.
    """

    tags: dict[str, str] = Field(default_factory=dict)
    device_ids: list[str] = Field(default_factory=list)
    percent: float = Field(default=100.0, gt=0, le=100)

    def matches(self, rollout_id: str, device_id: str, tags: Mapping[str, str]) -> bool:
        """Whether `device_id` (carrying `tags`) belongs to this rollout."""
        listed = device_id in self.device_ids
        tagged = bool(self.tags) and all(tags.get(key) == value for key, value in self.tags.items())
        matching = listed or tagged or (not self.tags and not self.device_ids)
        return matching and (
            self.percent >= 100 or stable_fraction(rollout_id, "select", device_id) < self.percent / 100
        )

    def select(self, rollout_id: str, fleet: Mapping[str, Mapping[str, str]]) -> set[str]:
        """The ids of `fleet` (device id → tags) that this rollout targets."""
        return {device_id for device_id, tags in fleet.items() if self.matches(rollout_id, device_id, tags)}


class GateThresholds(_Spec):
    """Limits a wave must stay within before the next wave starts; `None` disables a gate.

    - `max_install_failure_rate`: devices of the wave that gave up installing / devices of the wave (0..1).
    - `max_error_rate`: inference error rate of the updated cohort (0..1), an absolute limit (off by default).
    - `max_error_rate_increase`: inference error rate of the updated cohort minus the control cohort's,
      an absolute difference (0.01 = one percentage point).
    - `max_p95_ms`: p95 latency of the updated cohort in milliseconds, an absolute limit (off by default).
    - `max_p95_latency_ratio`: p95 latency of the updated cohort / p95 of the control cohort (≥ 1).
    - `max_psi`: population stability index of the predicted classes, control → updated
      (< 0.1 no shift, 0.1-0.25 moderate, > 0.25 major).
    - `max_js_divergence`: Jensen-Shannon divergence (base 2, 0..1) of the predicted classes.

    The absolute limits apply under either baseline; the comparisons with the control cohort only under
    `baseline: control` (under `absolute` they are reported as not applicable). Below `min_installs` devices
    in the wave, `min_inferences` inferences or `min_class_samples` predictions in a cohort a gate needs, a
    gate reports *insufficient data* instead of deciding.
    """

    max_install_failure_rate: float | None = Field(default=0.05, ge=0, le=1)
    max_error_rate: float | None = Field(default=None, ge=0, le=1)
    max_error_rate_increase: float | None = Field(default=0.01, ge=0, le=1)
    max_p95_ms: float | None = Field(default=None, gt=0)
    max_p95_latency_ratio: float | None = Field(default=1.25, ge=1)
    max_psi: float | None = Field(default=0.25, gt=0)
    max_js_divergence: float | None = Field(default=None, gt=0, le=1)
    min_installs: int = Field(default=1, ge=1)
    min_inferences: int = Field(default=200, ge=1)
    min_class_samples: int = Field(default=200, ge=1)


class Wave(_Spec):
    """One step of the rollout: how many devices are on the new version once it is done, and its bake.

    `percent` (of the selected devices) and `count` are cumulative: waves 1 % → 10 % → 100 % update
    1 %, then 9 % more, then the rest. Exactly one of them is set. `gates=None` uses the plan's gates.
    """

    percent: float | None = Field(default=None, gt=0, le=100)
    count: int | None = Field(default=None, ge=1)
    bake_seconds: float = Field(default=1800.0, ge=0)
    gates: GateThresholds | None = None

    @model_validator(mode="after")
    def _one_size(self) -> Self:
        if (self.percent is None) == (self.count is None):
            raise ValueError("a wave sets exactly one of `percent` or `count`")
        return self

    def describe(self) -> str:
        """`10%` or `25 devices`."""
        return f"{self.percent:g}%" if self.percent is not None else f"{self.count} devices"


def default_waves() -> list[Wave]:
    """1 % → 10 % → 50 % → 100 %, each baking 30 minutes under the plan's gates."""
    return [Wave(percent=p) for p in (1.0, 10.0, 50.0, 100.0)]


class RolloutPlan(_Spec):
    """What to roll out, to whom, in which waves, and how to react to failures.

    `baseline` left out (or null) is `control` when the plan names a `previous_version`, and `absolute` for
    a new model: its devices run another model or none, so there is no control cohort to compare with.
    """

    model: Name
    version: Version
    previous_version: Version | None = None
    baseline: Baseline = "control"
    selector: Selector = Field(default_factory=Selector)
    waves: list[Wave] = Field(default_factory=default_waves, min_length=1, max_length=100)
    gates: GateThresholds = Field(default_factory=GateThresholds)
    on_gate_failure: Literal["pause", "rollback"] = "pause"
    allow_partial: bool = False
    max_concurrent_downloads: int = Field(default=10, ge=1)
    device_timeout_seconds: float = Field(default=900.0, gt=0)
    max_retries: int = Field(default=2, ge=0, le=100)
    retry_backoff_seconds: float = Field(default=30.0, ge=0)
    retry_backoff_factor: float = Field(default=2.0, ge=1)
    retry_backoff_max_seconds: float = Field(default=900.0, ge=0)
    max_data_wait_seconds: float = Field(default=3600.0, ge=0)
    # Waves (numbered from 1) after whose passed gates the rollout pauses, held for a person's `promote` (the
    # continuous-training loop holds a candidate's canary so: `ct set --wait-for promote`). Never the last wave.
    hold_after_waves: list[int] = Field(default_factory=list, max_length=100)

    @model_validator(mode="before")
    @classmethod
    def _default_baseline(cls, data: Any) -> Any:
        # Resolved here, not at evaluation, so the stored plan says which baseline its gates use.
        if isinstance(data, dict) and data.get("baseline") is None:
            return {**data, "baseline": "control" if data.get("previous_version") is not None else "absolute"}
        return data

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        for unit in ("percent", "count"):
            sizes = [getattr(w, unit) for w in self.waves if getattr(w, unit) is not None]
            if any(b < a for a, b in itertools.pairwise(sizes)):
                raise ValueError(f"waves must not shrink: wave sizes by {unit} go {sizes} (each wave is cumulative)")
        if not self.allow_partial and self.waves[-1].percent != 100:
            raise ValueError(
                f"the last wave is {self.waves[-1].describe()}, not 100% of the selected devices: "
                "add a final `percent: 100` wave, or set `allow_partial: true`"
            )
        if self.previous_version is not None and self.previous_version == self.version:
            raise ValueError(f"previous_version equals the target version {self.version!r}")
        if self.on_gate_failure == "rollback" and self.previous_version is None:
            raise ValueError("on_gate_failure 'rollback' needs `previous_version`, the version to roll back to")
        if any(not 1 <= w < len(self.waves) for w in self.hold_after_waves):
            raise ValueError(
                f"hold_after_waves {self.hold_after_waves}: waves are numbered 1 to {len(self.waves)}, and a hold "
                "after the last wave would hold nothing"
            )
        if self.retry_backoff_max_seconds < self.retry_backoff_seconds:
            raise ValueError("retry_backoff_max_seconds is below retry_backoff_seconds")
        return self

    def judged_on(self) -> str:
        """What the gates judge the updated cohort against, in a sentence (the rollout's first decision says it)."""
        if self.baseline == "control":
            on = f"{self.model}:{self.previous_version}" if self.previous_version else f"other {self.model} versions"
            return f"gates compare with the control cohort ({on})"
        gates = self.gates
        limits = [
            f"{label} ≤ {value:g}"
            for label, value in (
                ("install failure rate", gates.max_install_failure_rate),
                ("error rate", gates.max_error_rate),
                ("p95 ms", gates.max_p95_ms),
            )
            if value is not None
        ]
        return f"gates on absolute limits, no control cohort ({', '.join(limits) or 'none set'})"

    def gates_for(self, wave: int) -> GateThresholds:
        """The gates of wave `wave` (its own, or the plan's)."""
        return self.waves[wave].gates or self.gates

    def retry_delay(self, attempts: int) -> float:
        """Seconds to wait before attempt `attempts + 1`: base * factor^(attempts - 1), capped."""
        delay = self.retry_backoff_seconds * self.retry_backoff_factor ** max(attempts - 1, 0)
        return min(delay, self.retry_backoff_max_seconds)


def wave_targets(plan: RolloutPlan, total: int) -> list[int]:
    """Cumulative number of devices updated at the end of each wave, for `total` selected devices.

    `ceil(percent * total / 100)` (so 1 % of 30 devices is 1 device, not 0) or `count`, never
    shrinking from one wave to the next and never above `total`.
    """
    targets: list[int] = []
    for wave in plan.waves:
        size = math.ceil(round(wave.percent * total / 100, 9)) if wave.percent is not None else wave.count or 0
        targets.append(min(total, max(size, targets[-1] if targets else 0)))
    return targets


def promotion_target(
    plan: RolloutPlan, total: int, current: int, *, to_wave: int | None = None, to_percent: float | None = None
) -> int:
    """The wave index an operator's promotion starts, from wave index `current` of `total` selected devices.

    Without a target: the next wave (`len(plan.waves)` after the last: the rollout completes). `to_wave`: that
    wave (an index). `to_percent`: the furthest wave that keeps at most that share of the selected devices on
    the new version, so a promotion never updates more devices than asked. `ValueError` says why a target
    is not beyond the current wave. Messages number waves from 1, as people read them.
    """
    count = len(plan.waves)
    if to_wave is None and to_percent is None:
        return current + 1
    if to_wave is not None:
        if to_wave >= count:
            raise ValueError(f"wave {to_wave + 1} does not exist: the plan has {count} waves")
        if to_wave <= current:
            raise ValueError(f"wave {to_wave + 1} is already under way (the current wave is {current + 1})")
        return to_wave
    assert to_percent is not None
    targets = wave_targets(plan, total)
    allowed = to_percent * total / 100 + 1e-9
    within = [index for index, size in enumerate(targets) if size <= allowed]
    furthest = max(within, default=-1)
    if furthest <= current:
        beyond = current + 1
        if beyond >= count:
            raise ValueError(f"the current wave {current + 1} is the last; promote without a target to complete")
        share = 100 * targets[beyond] / total if total else 100.0
        raise ValueError(
            f"no wave beyond the current one ({current + 1}) stays within {to_percent:g}%: "
            f"wave {beyond + 1} reaches {share:.3g}% ({targets[beyond]} of {total} devices)"
        )
    return furthest


def assign_waves(plan: RolloutPlan, rollout_id: str, device_ids: Iterable[str]) -> dict[str, int]:
    """Wave index of each device selected at the start: devices ranked by a stable per-rollout draw.

    Devices beyond the last target (a partial plan) are left out.
    """
    ranked = sorted(set(device_ids), key=lambda d: (stable_fraction(rollout_id, "wave", d), d))
    assignment: dict[str, int] = {}
    start = 0
    for index, end in enumerate(wave_targets(plan, len(ranked))):
        for device_id in ranked[start:end]:
            assignment[device_id] = index
        start = max(start, end)
    return assignment
