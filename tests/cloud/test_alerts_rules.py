"""The pure core of alerting: rules grouped into cohorts (`evaluate`) and open alerts reconciled (`reconcile`)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from cloud.alerts.rules import (
    FLEET,
    Aggregate,
    Condition,
    Miss,
    Observation,
    OpenAlert,
    Rule,
    evaluate,
    reconcile,
)
from protocol.telemetry import latency_histogram

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
ERRORS = Rule(name="error_rate", metric="error_rate", threshold=0.05, by="site", min_weight=100)


def cond(
    rule: str = "error_rate", cohort: str = "site=b", model: str | None = "digits", value: float = 0.2
) -> Condition:
    return Condition(rule, cohort, model, value, 0.05, "warning", f"{rule} {cohort}")


def rate(device: str, site: str | None, errors: int, inferences: int, model: str = "digits") -> Observation:
    tags = {"site": site} if site else {}
    return Observation("error_rate", errors / inferences, weight=inferences, device_id=device, tags=tags, model=model)


# -- evaluate ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("observations", "expected"),
    [
        pytest.param([rate("a1", "a", 1, 200), rate("b1", "b", 50, 200)], ["site=b"], id="only-the-bad-site"),
        # 0 + 30 errors over 100 + 200 inferences = 10%: the cohort's rate, not the mean of the devices' rates.
        pytest.param([rate("b1", "b", 0, 100), rate("b2", "b", 30, 200)], ["site=b"], id="weighted-by-inferences"),
        pytest.param([rate("b1", "b", 1, 900), rate("b2", "b", 40, 100)], [], id="one-bad-device-in-a-busy-site"),
        pytest.param([rate("b1", "b", 40, 50)], [], id="too-few-inferences-to-judge"),
        pytest.param([rate("x1", None, 90, 100)], [], id="a-device-without-the-tag-has-no-cohort"),
        pytest.param([rate("b1", "b", 10, 200), rate("b2", "b", 10, 200, "other")], [], id="per-model"),
    ],
)
def test_error_rate_is_judged_per_cohort(observations: list[Observation], expected: list[str]) -> None:
    assert [c.cohort for c in evaluate([ERRORS], observations)] == expected


def test_cohorts_of_the_fleet_a_device_and_a_fixed_one() -> None:
    observations = [rate("d1", "a", 20, 100), rate("d2", "a", 0, 100)]
    by_fleet = evaluate([ERRORS.model_copy(update={"by": FLEET})], observations)
    by_device = evaluate([ERRORS.model_copy(update={"by": "device"})], observations)
    assert [(c.cohort, c.value) for c in by_fleet] == [("fleet", 0.1)]
    assert [c.cohort for c in by_device] == ["device=d1"]
    stuck = Rule(name="rollout_stuck", metric="stalled", threshold=60)
    fixed = [Observation("stalled", 61, Aggregate.MAX, cohort="rollout=3", model="digits")]
    assert [(c.cohort, c.model) for c in evaluate([stuck], fixed)] == [("rollout=3", "digits")]


def test_latency_is_the_p95_of_the_merged_histograms() -> None:
    rule = Rule(name="latency_p95", metric="p95", threshold=100, by=FLEET)
    fast = Observation("p95", 0, Aggregate.P95, histogram=latency_histogram([1.0] * 96), device_id="a")
    slow = Observation("p95", 0, Aggregate.P95, histogram=latency_histogram([400.0] * 4), device_id="b")
    assert evaluate([rule], [fast, slow]) == []  # 4% slow: the merged p95 is fast
    slower = Observation("p95", 0, Aggregate.P95, histogram=latency_histogram([9000.0] * 10), device_id="b")
    (condition,) = evaluate([rule], [fast, slower])
    assert condition.value == 5000  # above the last bucket: at least its bound, a finite number


def test_offline_devices_are_counted_per_cohort() -> None:
    rule = Rule(name="devices_offline", metric="off", op=">=", threshold=2, by="site", per_model=False)
    off = [Observation("off", 900, Aggregate.COUNT, device_id=d, tags={"site": s}) for d, s in
           [("a1", "a"), ("b1", "b"), ("b2", "b")]]  # fmt: skip
    assert [(c.cohort, c.value) for c in evaluate([rule], off)] == [("site=b", 2.0)]


# -- reconcile --------------------------------------------------------------------------------------

KEY = cond().key


@pytest.mark.parametrize(
    ("open_alerts", "conditions", "resolve_after", "opens", "seen", "misses", "resolves"),
    [
        pytest.param([], [cond()], 1, [KEY], [], [], [], id="new-condition-opens"),
        pytest.param([OpenAlert(1, KEY)], [cond()], 1, [], [1], [], [], id="held-condition-updates-never-reopens"),
        pytest.param([OpenAlert(1, KEY)], [], 1, [], [], [], [1], id="gone-resolves"),
        pytest.param([OpenAlert(1, KEY)], [], 3, [], [], [Miss(1, 1)], [], id="first-quiet-evaluation-counts"),
        pytest.param([OpenAlert(1, KEY, misses=2)], [], 3, [], [], [], [1], id="third-quiet-evaluation-resolves"),
        pytest.param([OpenAlert(1, KEY, misses=2)], [cond()], 3, [], [1], [], [], id="flap-back-keeps-the-alert"),
        pytest.param(
            [OpenAlert(1, KEY)],
            [cond(), cond(cohort="site=c")],
            1,
            [cond(cohort="site=c").key],
            [1],
            [],
            [],
            id="another-cohort-opens-its-own",
        ),
        pytest.param(
            [OpenAlert(1, KEY)], [cond(model="other")], 1, [cond(model="other").key], [], [], [1], id="other-model"
        ),
    ],
)
def test_reconcile(
    open_alerts: list[OpenAlert],
    conditions: list[Condition],
    resolve_after: int,
    opens: list[str],
    seen: list[int],
    misses: list[Miss],
    resolves: list[int],
) -> None:
    result = reconcile(open_alerts, conditions, NOW, resolve_after=resolve_after)
    assert [c.key for c in result.opens] == opens
    assert [s.alert_id for s in result.seen] == seen
    assert result.misses == misses
    assert result.resolves == resolves


def test_a_flapping_condition_opens_one_alert_and_resolves_once() -> None:
    """Present, absent, present, absent x3, present: one alert until three quiet evaluations, then a new one."""
    alerts: dict[int, OpenAlert] = {}
    opened, resolved = 0, 0
    for present in [True, False, True, False, True, False, False, False, True]:
        result = reconcile(alerts.values(), [cond()] if present else [], NOW, resolve_after=3)
        for _ in result.opens:
            opened += 1
            alerts[opened] = OpenAlert(opened, KEY)
        for seen in result.seen:
            alerts[seen.alert_id] = OpenAlert(seen.alert_id, KEY, 0)
        for miss in result.misses:
            alerts[miss.alert_id] = OpenAlert(miss.alert_id, KEY, miss.misses)
        for alert_id in result.resolves:
            resolved += 1
            del alerts[alert_id]
    assert (opened, resolved, list(alerts)) == (2, 1, [2])


def test_resolve_after_below_one_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        reconcile([], [], NOW, resolve_after=0)
