"""Rollouts the control cohort cannot judge: a new model, a control cohort on another model, too little data;
and promotions to a later wave. Pure engine scenarios, driven like the service drives it."""

from __future__ import annotations

import re
from datetime import timedelta

from cloud.rollouts import CohortStats, Promote, RolloutPlan, RolloutStatus
from cloud.rollouts.decisions import ControlMismatch, GateInconclusive, GatePassed, GatesWaiting, WavePromoted
from tests.cloud.rollouts.sim import Sim, cohort, fleet_of

NEW_MODEL = {"model": "ocr", "version": "1.0", "max_data_wait_seconds": 300}
TWO_WAVES = [{"count": 1, "bake_seconds": 60}, {"percent": 100, "bake_seconds": 60}]


def new_model_plan(**fields: object) -> RolloutPlan:
    """A first rollout of `ocr:1.0`: no previous version, so no control cohort to compare with."""
    gates = {"max_error_rate": 0.01, "max_p95_ms": 50, "min_inferences": 100, "min_class_samples": 100}
    return RolloutPlan.model_validate({**NEW_MODEL, "waves": TWO_WAVES, "gates": gates, **fields})


def comparison_plan(**fields: object) -> RolloutPlan:
    """digits 1.0 → 2.0, judged against the control cohort."""
    base = {"model": "digits", "version": "2.0", "previous_version": "1.0", "waves": TWO_WAVES}
    return RolloutPlan.model_validate({**base, "max_data_wait_seconds": 300, **fields})


# Devices running another model, or none: of `ocr` (or of digits 1.0) they report no inference at all.
OTHER_MODEL = CohortStats(devices=4, runs={"mnist:3.1": 3, "none": 1})


def test_first_rollout_of_a_new_model_completes_on_absolute_gates() -> None:
    sim = Sim(new_model_plan(), fleet_of(5))
    sim.control = OTHER_MODEL
    sim.wave = cohort(n=500, latency_ms=8.0)
    sim.step()
    sim.run_updates()
    assert sim.status is RolloutStatus.COMPLETED, sim.kinds()
    passed = [d for d in sim.decisions if isinstance(d, GatePassed)]
    assert len(passed) == 2
    verdicts = {r.name: r.verdict.value for r in passed[0].report.results}
    assert verdicts["error_rate"] == verdicts["p95_latency_ms"] == "passed"
    assert verdicts["class_shift_psi"] == verdicts["error_rate_increase"] == "not_applicable"
    assert "gates on absolute limits" in sim.decisions[0].message
    assert "control_mismatch" not in sim.kinds() and "gates_waiting" not in sim.kinds()


def test_first_rollout_of_a_new_model_pauses_when_it_breaks_an_absolute_limit() -> None:
    sim = Sim(new_model_plan(), fleet_of(5))
    sim.control = OTHER_MODEL
    sim.wave = cohort(n=500, errors=25)  # 5 % errors, limit 1 %
    sim.step()
    sim.succeed(sim.in_wave(0))
    assert sim.status is RolloutStatus.PAUSED
    assert sim.state.reason == "gate failed: error_rate"


def test_comparison_against_a_control_cohort_on_another_model_says_so_instead_of_waiting_silently() -> None:
    sim = Sim(comparison_plan(), fleet_of(5))
    sim.control = OTHER_MODEL
    sim.step()
    sim.succeed(sim.in_wave(0))
    mismatch = [d for d in sim.decisions if isinstance(d, ControlMismatch)]
    assert len(mismatch) == 1, sim.kinds()
    assert mismatch[0].wave == 0 and mismatch[0].expected == "digits:1.0"
    assert mismatch[0].runs == {"mnist:3.1": 3, "none": 1}
    assert mismatch[0].message.startswith(
        "wave 1: the comparative gates cannot decide: the control cohort serves mnist:3.1 on 3 devices, "
        "no model on 1 device, not digits:1.0."
    )
    assert "baseline: absolute" in mismatch[0].message
    assert sim.state.waiting is not None and "mnist:3.1" in sim.state.waiting  # the status shows it too
    sim.step(after=30)
    assert sim.kinds().count("control_mismatch") == 1, "recorded once a wave, not at every step"


def test_max_data_wait_expiry_pauses_with_a_decision_naming_what_was_missing() -> None:
    sim = Sim(comparison_plan(max_data_wait_seconds=120), fleet_of(5))
    sim.control = CohortStats(devices=4, runs={"digits:1.0": 4})  # the right version, but no traffic
    sim.step()
    sim.succeed(sim.in_wave(0))
    _, decisions = sim.step(after=60)  # the bake is over
    (waiting,) = [d for d in decisions if isinstance(d, GatesWaiting)]
    assert waiting.message.startswith("wave 1 baked, but gates lack data: error_rate_increase (control cohort has 0")
    assert "(max_data_wait_seconds 120), then the rollout pauses" in waiting.message
    assert waiting.until == sim.now + timedelta(seconds=120)
    assert sim.state.waiting is not None and sim.state.waiting.startswith("gates error_rate_increase")
    assert sim.step(after=119)[1] == []
    _, decisions = sim.step(after=1)
    assert sim.status is RolloutStatus.PAUSED
    (inconclusive,) = [d for d in decisions if isinstance(d, GateInconclusive)]
    assert inconclusive.message.startswith(
        "wave 1 gates still lack data 120 s after the bake (max_data_wait_seconds): "
        "error_rate_increase (control cohort has 0 inferences, needs 200 (its devices serve digits:1.0 on 4 devices))"
    )
    assert sim.state.reason is not None
    assert sim.state.reason.startswith("insufficient data after waiting 120 s: error_rate_increase (control cohort")
    assert sim.state.waiting is None  # paused: nothing is waited for any more


def test_promote_to_a_later_wave_dispatches_every_device_up_to_it() -> None:
    waves = [{"count": 1, "bake_seconds": 600}, {"count": 3, "bake_seconds": 600}, {"percent": 100}]
    sim = Sim(comparison_plan(waves=waves), fleet_of(8))
    sim.step()
    sim.succeed(sim.in_wave(0))
    actions, decisions = sim.step(commands=[Promote(command_id="p", by="alice", to_wave=2)])
    (promoted,) = [d for d in decisions if isinstance(d, WavePromoted)]
    assert (promoted.wave, promoted.to_wave) == (0, 2)
    assert promoted.message == (
        "waves 1-2 promoted by alice to wave 3: bakes and gates skipped, their devices install along with wave 3"
    )
    assert sim.state.current_wave == 2
    assert sorted(sim.dispatched(actions)) == sorted(sim.in_wave(1) + sim.in_wave(2))
    assert len(sim.dispatched(actions)) == 7


def test_promote_to_a_percentage_stops_at_the_furthest_wave_within_it() -> None:
    waves = [{"percent": p, "bake_seconds": 600} for p in (10, 25, 50, 100)]
    sim = Sim(comparison_plan(waves=waves), fleet_of(20))
    sim.step()
    sim.succeed(sim.in_wave(0))
    _, decisions = sim.step(commands=[Promote(command_id="p", to_percent=40)])
    assert [d.kind for d in decisions][:2] == ["wave_promoted", "wave_started"]
    assert sim.state.current_wave == 1  # 25 % is within 40 %; 50 % is not
    _, decisions = sim.step(commands=[Promote(command_id="q", to_percent=40)])
    assert [d.kind for d in decisions] == ["command_rejected"]
    assert "no wave beyond the current one (2) stays within 40%: wave 3 reaches 50% (10 of 20 devices)" in (
        decisions[0].message
    )


def test_decision_messages_number_waves_from_one() -> None:
    sim = Sim(comparison_plan(), fleet_of(4))
    sim.step()
    sim.run_updates()
    about_waves = [d.message for d in sim.decisions if hasattr(d, "wave")]
    assert about_waves, sim.kinds()
    assert not [m for m in about_waves if re.search(r"\bwave 0\b", m)], about_waves
    started = [d.message for d in sim.decisions if d.kind == "wave_started"]
    assert started[0].startswith("wave 1 (1 devices) started") and started[1].startswith("wave 2 (100%) started")
