"""Rollout plans: defaults, validation messages, stable selection and wave assignment."""

from __future__ import annotations

import re

import pytest
from pydantic import ValidationError

from cloud.cli.rollouts import build_plan, promote_body
from cloud.rollouts import GateThresholds, RolloutPlan, Selector, Wave, assign_waves, promotion_target, wave_targets


def plan(**fields: object) -> RolloutPlan:
    return RolloutPlan.model_validate({"model": "digits", "version": "2.0", "previous_version": "1.0", **fields})


def test_default_plan_goes_one_ten_fifty_hundred_percent() -> None:
    p = plan()
    assert [w.percent for w in p.waves] == [1, 10, 50, 100]
    assert p.on_gate_failure == "pause"
    assert p.gates.max_psi == 0.25


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"waves": [{"percent": 50}, {"percent": 10}, {"percent": 100}]}, "waves must not shrink"),
        ({"waves": [{"count": 5}, {"count": 2}, {"percent": 100}]}, "waves must not shrink"),
        ({"waves": [{"percent": 10}, {"percent": 50}]}, "add a final `percent: 100` wave"),
        ({"waves": [{"percent": 10, "count": 3}, {"percent": 100}]}, "exactly one of `percent` or `count`"),
        ({"waves": [{"bake_seconds": 5}]}, "exactly one of `percent` or `count`"),
        ({"waves": []}, "at least 1 item"),
        ({"previous_version": None, "on_gate_failure": "rollback"}, "needs `previous_version`"),
        ({"previous_version": "2.0"}, "equals the target version"),
        ({"gates": {"max_p95_latency_ratio": 0.5}}, "max_p95_latency_ratio"),
        ({"gates": {"max_install_failure_rate": 1.5}}, "max_install_failure_rate"),
        ({"gates": {"max_js_divergence": 2}}, "max_js_divergence"),
        ({"gates": {"min_inferences": 0}}, "min_inferences"),
        ({"gates": {"max_psl": 0.2}}, "max_psl"),  # a typo must not silently drop the gate
        ({"max_concurrent_downloads": 0}, "max_concurrent_downloads"),
        ({"retry_backoff_seconds": 60, "retry_backoff_max_seconds": 10}, "retry_backoff_max_seconds"),
        ({"selector": {"percent": 0}}, "percent"),
        ({"version": "bad version!"}, "version"),
    ],
)
def test_rejects_invalid_plan_with_a_message_naming_the_problem(fields: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        plan(**fields)


def test_partial_plan_may_stop_short_of_the_whole_fleet_when_stated() -> None:
    p = plan(waves=[{"count": 2}, {"count": 5}], allow_partial=True)
    assert wave_targets(p, 100) == [2, 5]
    assert wave_targets(p, 3) == [2, 3]


def test_wave_targets_round_up_so_the_first_wave_is_never_empty() -> None:
    assert wave_targets(plan(), 30) == [1, 3, 15, 30]
    assert wave_targets(plan(), 100) == [1, 10, 50, 100]
    assert wave_targets(plan(), 1) == [1, 1, 1, 1]
    assert wave_targets(plan(), 0) == [0, 0, 0, 0]


def test_mixed_count_and_percent_waves_never_shrink() -> None:
    p = plan(waves=[{"count": 20}, {"percent": 10}, {"percent": 100}])
    assert wave_targets(p, 100) == [20, 20, 100]


def test_wave_assignment_is_stable_across_restarts_and_input_order() -> None:
    devices = [f"dev-{i}" for i in range(200)]
    first = assign_waves(plan(), "rollout-7", devices)
    again = assign_waves(plan(), "rollout-7", list(reversed(devices)))
    assert first == again
    assert sorted(list(first.values()).count(w) for w in range(4)) == [2, 18, 80, 100]
    other = assign_waves(plan(), "rollout-8", devices)
    assert [d for d, w in first.items() if w == 0] != [d for d, w in other.items() if w == 0]


def test_selector_matches_listed_ids_or_all_tags() -> None:
    selector = Selector(tags={"site": "lab", "tier": "edge"}, device_ids=["special"])
    fleet = {
        "a": {"site": "lab", "tier": "edge", "extra": "x"},
        "b": {"site": "lab"},
        "special": {},
        "c": {"site": "field", "tier": "edge"},
    }
    assert selector.select("r", fleet) == {"a", "special"}
    assert Selector().select("r", fleet) == set(fleet)


def test_selector_percent_picks_a_stable_share_of_the_group() -> None:
    fleet = {f"dev-{i}": {"site": "lab"} for i in range(2000)}
    selector = Selector(tags={"site": "lab"}, percent=25)
    chosen = selector.select("rollout-1", fleet)
    assert 400 < len(chosen) < 600
    assert selector.select("rollout-1", fleet) == chosen
    # a device's draw does not depend on who else is in the fleet, so late joiners are drawn alike
    assert selector.select("rollout-1", {d: fleet[d] for d in list(fleet)[:100]}) == {
        d for d in list(fleet)[:100] if d in chosen
    }


def test_retry_delay_grows_exponentially_up_to_the_cap() -> None:
    p = plan(retry_backoff_seconds=10, retry_backoff_factor=3, retry_backoff_max_seconds=100)
    assert [p.retry_delay(n) for n in (1, 2, 3, 4)] == [10, 30, 90, 100]


def test_a_wave_can_carry_its_own_gates() -> None:
    strict = GateThresholds(max_install_failure_rate=0.0)
    p = plan(waves=[Wave(percent=10, gates=strict), Wave(percent=100)])
    assert p.gates_for(0) is strict
    assert p.gates_for(1) == GateThresholds()


def test_plan_round_trips_through_json() -> None:
    p = plan(waves=[{"count": 3, "bake_seconds": 10}, {"percent": 100}], on_gate_failure="rollback")
    assert RolloutPlan.model_validate_json(p.model_dump_json()) == p


def test_a_new_model_without_previous_version_defaults_to_absolute_gates() -> None:
    new_model = RolloutPlan.model_validate({"model": "ocr", "version": "1.0"})
    assert new_model.baseline == "absolute"
    assert plan().baseline == "control"  # with a previous version: compared with the control cohort
    assert plan(baseline="absolute").baseline == "absolute"  # the operator's explicit choice wins
    explicit = RolloutPlan.model_validate({"model": "ocr", "version": "1.0", "baseline": "control"})
    assert explicit.baseline == "control"
    stored = new_model.model_dump(mode="json")
    assert stored["baseline"] == "absolute"  # the stored plan says which baseline its gates use
    assert RolloutPlan.model_validate(stored) == new_model
    with pytest.raises(ValidationError, match="baseline"):
        plan(baseline="yesterday")


def test_the_first_decision_says_what_the_gates_judge_against() -> None:
    new_model = RolloutPlan.model_validate({"model": "ocr", "version": "1.0", "gates": {"max_p95_ms": 50}})
    assert new_model.judged_on() == (
        "gates on absolute limits, no control cohort (install failure rate ≤ 0.05, p95 ms ≤ 50)"
    )
    assert plan().judged_on() == "gates compare with the control cohort (digits:1.0)"


FOUR_WAVES = [{"percent": p} for p in (1, 10, 50, 100)]


@pytest.mark.parametrize(
    ("current", "target", "expected"),
    [
        (0, {}, 1),  # plain promote: the next wave
        (3, {}, 4),  # ... and after the last one: complete
        (0, {"to_wave": 2}, 2),
        (0, {"to_percent": 50}, 2),  # 50 % of 20 devices = 10: wave 3 reaches exactly that
        (0, {"to_percent": 30}, 1),  # waves reach 1, 2, 10, 20 devices: at most 6 allowed stops at wave 2
        (1, {"to_percent": 100}, 3),
    ],
)
def test_promotion_target_never_updates_more_devices_than_asked(
    current: int, target: dict[str, float], expected: int
) -> None:
    p = plan(waves=FOUR_WAVES)
    assert wave_targets(p, 20) == [1, 2, 10, 20]
    assert promotion_target(p, 20, current, **target) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("current", "target", "message"),
    [
        (1, {"to_wave": 1}, "wave 2 is already under way (the current wave is 2)"),
        (1, {"to_wave": 0}, "wave 1 is already under way"),
        (0, {"to_wave": 4}, "wave 5 does not exist: the plan has 4 waves"),
        (1, {"to_percent": 30}, "no wave beyond the current one (2) stays within 30%: wave 3 reaches 50% (10 of 20"),
        (3, {"to_percent": 100}, "the current wave 4 is the last; promote without a target to complete"),
    ],
)
def test_promotion_target_beyond_reach_is_refused_with_waves_numbered_from_one(
    current: int, target: dict[str, float], message: str
) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        promotion_target(plan(waves=FOUR_WAVES), 20, current, **target)  # type: ignore[arg-type]


def test_cli_options_for_a_new_model_become_absolute_limits_and_a_data_wait() -> None:
    body = build_plan(
        "ocr:1.0",
        previous=None,
        to=["site=lab"],
        percent=100,
        waves="1,100%",
        bake="30s",
        on_failure="pause",
        gates=[],
        min_samples=50,
        max_concurrent=None,
        timeout=None,
        retries=None,
        baseline=None,
        max_error_rate="0.01",
        max_p95_ms="50",
        max_data_wait="10m",
    )
    assert "baseline" not in body  # left to the plan: absolute, since there is no --from
    assert body["gates"] == {"min_inferences": 50, "min_class_samples": 50, "max_error_rate": 0.01, "max_p95_ms": 50.0}
    assert body["max_data_wait_seconds"] == 600.0
    created = RolloutPlan.model_validate(body)
    assert created.baseline == "absolute"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"baseline": "sideways"}, "--baseline 'sideways': use control or absolute"),
        ({"max_error_rate": "lots"}, "--max-error-rate 'lots': use a number, or off"),
        ({"max_data_wait": "soon"}, "--max-data-wait 'soon': use seconds or a number with s, m or h"),
        ({"timeout": "later"}, "--device-timeout 'later'"),
    ],
)
def test_bad_cli_options_are_refused_naming_the_option(options: dict[str, str], message: str) -> None:
    fields: dict[str, object] = {
        "previous": "1.0",
        "to": [],
        "percent": 100,
        "waves": None,
        "bake": None,
        "on_failure": "pause",
        "gates": [],
        "min_samples": None,
        "max_concurrent": None,
        "timeout": None,
        "retries": None,
    }
    with pytest.raises(ValueError, match=re.escape(message)):
        build_plan("digits:2.0", **(fields | options))  # type: ignore[arg-type]


def test_promote_options_become_the_api_body_with_waves_numbered_from_one() -> None:
    assert promote_body(None, None) == {}
    assert promote_body(3, None) == {"wave_number": 3}
    assert promote_body(None, 50) == {"to_percent": 50}
    with pytest.raises(ValueError, match="not both"):
        promote_body(2, 50)
