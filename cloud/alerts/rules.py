"""Alert rules and the two pure decisions of alerting: which conditions hold now, and what that does to open alerts.

A *source* (`cloud.alerts.sources`) turns stored data into `Observation`s: one number per device (or per rollout)
and model, with how it combines into a cohort's number (`Aggregate`). `evaluate(rules, observations)` groups the
observations of each rule's metric into cohorts — the whole fleet, a device, or a tag value (`site=b`) — and
returns a `Condition` for every cohort (and model) whose combined value breaks the rule's threshold.
`reconcile(open_alerts, conditions, now, resolve_after=N)` decides what happens to the stored alerts: a condition
without an open alert opens one, a condition with one updates it (never a second one), and an open alert whose
condition is absent for `resolve_after` evaluations in a row is resolved (a flapping condition neither spams
nor closes at the first quiet evaluation). Operators' `RuleOverride`s switch a rule off or on, or change its
threshold, per model or fleet-wide (`*`): `effective_rule` resolves them field by field, the model's over the fleet's
over the settings', and `evaluate` judges each model's cohorts by its own effective rule. No IO here.
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from protocol.telemetry import LATENCY_BUCKETS_MS, histogram_quantile, merge_histograms

__all__ = [
    "ANY_MODEL",
    "FLEET",
    "Aggregate",
    "Condition",
    "EffectiveRule",
    "Miss",
    "Observation",
    "OpenAlert",
    "Reconciliation",
    "Rule",
    "RuleOverride",
    "Seen",
    "alert_key",
    "cohort_of",
    "effective_rule",
    "evaluate",
    "model_name_of",
    "reconcile",
    "threshold_problem",
]

FLEET = "fleet"  # the cohort of a rule grouped over the whole fleet
ANY_MODEL = "*"  # an override's model for every model
DEVICE = "device"  # `by` value: one cohort per device

_OPERATORS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


class Aggregate(StrEnum):
    """How the observations of a cohort combine into its value."""

    MEAN = "mean"  # weighted by `weight` (error rate: errors / inferences over the cohort)
    P95 = "p95"  # the 95th percentile of the merged latency histograms (bucket upper bound, ms)
    COUNT = "count"  # how many observations (devices offline)
    MAX = "max"  # the largest value (seconds a rollout has not advanced)


@dataclass(frozen=True)
class Observation:
    """One number a source read: of a device (`device_id`, its `tags`) or of a fixed `cohort` (`rollout=3`)."""

    metric: str
    value: float
    aggregate: Aggregate = Aggregate.MEAN
    weight: float = 1.0  # MEAN: the value's weight (inferences); rules with `min_weight` need that much in all
    device_id: str | None = None
    tags: Mapping[str, str] = field(default_factory=dict)
    model: str | None = None
    cohort: str | None = None  # set: the observation's cohort whatever the rule's `by` (a rollout)
    histogram: Sequence[int] = ()  # P95: the device's merged latency histogram


class Rule(BaseModel):
    """Alert when `metric` of a cohort is `op` `threshold` (with at least `min_weight` behind it)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(pattern=r"^[a-z][a-z0-9_]*$", max_length=64, description="The rule's id, e.g. error_rate.")
    metric: str = Field(min_length=1, max_length=64, description="Which observations it reads.")
    op: Literal[">", ">=", "<", "<="] = ">"
    threshold: float
    by: str = Field(
        default=FLEET,
        min_length=1,
        max_length=64,
        description="Cohorts: `fleet` (one), `device` (one per device), or a tag key (one per value: site=b).",
    )
    per_model: bool = Field(default=True, description="One cohort per model too (observations naming a model).")
    min_weight: float = Field(default=0.0, ge=0, description="Below this total weight the cohort is not judged.")
    severity: Literal["info", "warning", "critical"] = "warning"
    description: str = ""


@dataclass(frozen=True)
class Condition:
    """A rule broken now by one cohort (and model): what an open alert stands for."""

    rule: str
    cohort: str
    model: str | None
    value: float
    threshold: float
    severity: str
    message: str

    @property
    def key(self) -> str:
        """The alert's identity: one open alert per key."""
        return alert_key(self.rule, self.cohort, self.model)


def alert_key(rule: str, cohort: str, model: str | None) -> str:
    """`rule|cohort|model`: at most one open alert holds it."""
    return f"{rule}|{cohort}|{model or ''}"


def cohort_of(rule: Rule, observation: Observation) -> str | None:
    """The cohort an observation counts in for `rule`; None when it has none (a device without the tag)."""
    if observation.cohort is not None:
        return observation.cohort
    if rule.by == FLEET:
        return FLEET
    if observation.device_id is None:
        return None
    if rule.by == DEVICE:
        return f"device={observation.device_id}"
    value = observation.tags.get(rule.by)
    return None if value is None else f"{rule.by}={value}"


def _combine(observations: Sequence[Observation]) -> tuple[float, float] | None:
    """(value, total weight) of a cohort's observations; None when they say nothing (no weight, empty histogram)."""
    how = observations[0].aggregate
    weight = sum(o.weight for o in observations)
    if how is Aggregate.COUNT:
        return float(len(observations)), weight
    if how is Aggregate.MAX:
        return max(o.value for o in observations), weight
    if how is Aggregate.P95:
        p95 = histogram_quantile(merge_histograms(o.histogram for o in observations), 0.95)
        if p95 is None:
            return None
        # Above the last bucket: the p95 is at least its bound (JSON and the alert keep a finite number).
        return (LATENCY_BUCKETS_MS[-1] if math.isinf(p95) else p95), weight
    if weight <= 0:
        return None
    return sum(o.value * o.weight for o in observations) / weight, weight


@dataclass(frozen=True)
class RuleOverride:
    """An operator's change to a rule for one model (or `*`): `enabled`/`threshold` None leave it as it was."""

    rule: str
    model: str = ANY_MODEL
    enabled: bool | None = None
    threshold: float | None = None


@dataclass(frozen=True)
class EffectiveRule:
    """A rule as it applies to one model, and where each value came from (`settings`, `*` or `model`)."""

    rule: Rule
    enabled: bool
    enabled_from: str
    threshold_from: str


# The range a threshold must be in, per rule (bounds inclusive); None: the rule has no threshold to change.
THRESHOLD_RANGES: dict[str, tuple[float, float] | None] = {
    "error_rate": (0.0, 1.0),  # a share of inferences
    "latency_p95": (1.0, 600_000.0),  # ms
    "devices_offline": (1.0, 1_000_000.0),  # devices
    "rollout_stuck": (60.0, 90 * 86400.0),  # seconds
    "estimated_accuracy": (0.001, 1.0),  # an accuracy drop
    "drift": None,  # a cohort drifted or not (1/0): its statistics' thresholds are drift settings
}


def threshold_problem(rule: Rule, value: float) -> str | None:
    """Why `value` cannot be `rule`'s threshold, or None when it can."""
    if not math.isfinite(value):
        return f"{rule.name}: the threshold must be a finite number, got {value}"
    if rule.name not in THRESHOLD_RANGES:
        return None
    bounds = THRESHOLD_RANGES[rule.name]
    if bounds is None:
        return f"{rule.name} has no threshold to change (a cohort drifted or not); switch it --off or --on instead"
    low, high = bounds
    if not low <= value <= high:
        return f"{rule.name}: the threshold must be between {low:g} and {high:g} ({rule.metric}), got {value:g}"
    return None


def model_name_of(model: str | None) -> str | None:
    """The model name an alert's model stands for: `digits` of `digits` and of `digits:1.0` (drift rules)."""
    return None if model is None else model.partition(":")[0]


def effective_rule(rule: Rule, model: str | None, overrides: Iterable[RuleOverride] = ()) -> EffectiveRule:
    """`rule` for `model` (a name, or None for the fleet-wide view): each field from the model's override if it sets
    it, else the fleet's (`*`), else the settings'."""
    name = model_name_of(model)
    mine = [o for o in overrides if o.rule == rule.name and o.model in {ANY_MODEL, name}]
    ordered = sorted(mine, key=lambda o: o.model != ANY_MODEL)  # the fleet's first, the model's last: it wins
    enabled, enabled_from, threshold, threshold_from = True, "settings", rule.threshold, "settings"
    for override in ordered:
        level = "model" if override.model != ANY_MODEL else ANY_MODEL
        if override.enabled is not None:
            enabled, enabled_from = override.enabled, level
        if override.threshold is not None:
            threshold, threshold_from = override.threshold, level
    changed = rule if threshold == rule.threshold else rule.model_copy(update={"threshold": threshold})
    return EffectiveRule(changed, enabled, enabled_from, threshold_from)


def _message(rule: Rule, cohort: str, model: str | None, value: float) -> str:
    where = cohort + (f" ({model})" if model else "")
    return f"{rule.name}: {where} {rule.metric} = {value:.4g} {rule.op} {rule.threshold:g}"


def evaluate(
    rules: Iterable[Rule], observations: Iterable[Observation], overrides: Sequence[RuleOverride] = ()
) -> list[Condition]:
    """Every (rule, cohort, model) whose combined observations break the rule now, sorted by key; each model judged
    by its effective rule (`overrides`: switched off for it, or its own threshold)."""
    by_metric: dict[str, list[Observation]] = {}
    for observation in observations:
        by_metric.setdefault(observation.metric, []).append(observation)
    conditions: list[Condition] = []
    for rule in rules:
        groups: dict[tuple[str, str | None], list[Observation]] = {}
        for observation in by_metric.get(rule.metric, []):
            cohort = cohort_of(rule, observation)
            if cohort is not None:
                model = observation.model if rule.per_model else None
                groups.setdefault((cohort, model), []).append(observation)
        for (cohort, model), members in groups.items():
            effective = effective_rule(rule, model, overrides)
            if not effective.enabled:
                continue  # switched off for this model (or the fleet): an open alert of it resolves as if quiet
            judged = effective.rule
            combined = _combine(members)
            if combined is None or combined[1] < judged.min_weight:
                continue  # too little data to judge: no condition either way
            value = combined[0]
            if _OPERATORS[judged.op](value, judged.threshold):
                message = _message(judged, cohort, model, value)
                conditions.append(
                    Condition(judged.name, cohort, model, value, judged.threshold, judged.severity, message)
                )
    return sorted(conditions, key=lambda c: c.key)


@dataclass(frozen=True)
class OpenAlert:
    """A stored, unresolved alert as `reconcile` needs it: its key and how many evaluations in a row missed it."""

    id: int
    key: str
    misses: int = 0


@dataclass(frozen=True)
class Seen:
    """An open alert whose condition holds again: new value, seen now, misses back to 0."""

    alert_id: int
    condition: Condition


@dataclass(frozen=True)
class Miss:
    """An open alert whose condition is absent this evaluation, not long enough to resolve it."""

    alert_id: int
    misses: int


@dataclass(frozen=True)
class Reconciliation:
    """What one evaluation does to the stored alerts."""

    now: datetime
    opens: list[Condition] = field(default_factory=list)
    seen: list[Seen] = field(default_factory=list)
    misses: list[Miss] = field(default_factory=list)
    resolves: list[int] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """True when an alert opens or resolves (what webhooks and the audit log hear of)."""
        return bool(self.opens or self.resolves)


def reconcile(
    open_alerts: Iterable[OpenAlert], conditions: Iterable[Condition], now: datetime, *, resolve_after: int = 1
) -> Reconciliation:
    """Open, update, count a miss on, or resolve: one open alert per key while its condition holds.

    An alert resolves once its condition has been absent for `resolve_after` evaluations in a row; a
    condition back before that only resets the count. Several open alerts of one key (never made here) all
    take the update. `ValueError` for `resolve_after` < 1.
    """
    if resolve_after < 1:
        raise ValueError(f"resolve_after must be at least 1 evaluation, got {resolve_after}")
    current = {c.key: c for c in conditions}
    result = Reconciliation(now=now)
    held: set[str] = set()
    for alert in open_alerts:
        condition = current.get(alert.key)
        if condition is not None:
            result.seen.append(Seen(alert.id, condition))
            held.add(alert.key)
        elif alert.misses + 1 >= resolve_after:
            result.resolves.append(alert.id)
        else:
            result.misses.append(Miss(alert.id, alert.misses + 1))
    result.opens.extend(c for key, c in sorted(current.items()) if key not in held)
    return result
