"""Rollout engine scenarios: gates, rollback, restarts, late joiners, retries, limits and commands."""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest

from cloud.rollouts import (
    Abort,
    DevicePhase,
    DeviceReport,
    Dispatch,
    GateThresholds,
    Observations,
    Pause,
    Promote,
    Rollback,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    Wait,
    inflight_actions,
    step,
)
from cloud.rollouts.decisions import GateFailed, GatePassed, RetryScheduled
from protocol.messages import ModelRef, ReportedState, UpdatePhase, UpdateStatus
from tests.cloud.rollouts.sim import T0, Sim, active, cohort, failed, fleet_of

SHA = "0" * 64


def plan(**fields: object) -> RolloutPlan:
    base = {
        "model": "digits",
        "version": "2.0",
        "previous_version": "1.0",
        "waves": [{"percent": 10, "bake_seconds": 60}, {"percent": 50, "bake_seconds": 60}, {"percent": 100}],
        "max_concurrent_downloads": 5,
    }
    return RolloutPlan.model_validate({**base, **fields})


def test_happy_rollout_updates_every_device_wave_by_wave() -> None:
    sim = Sim(plan(), fleet_of(40))
    sim.step()
    sim.run_updates()
    assert sim.status is RolloutStatus.COMPLETED
    assert sorted(sim.dispatched()) == sorted(sim.fleet)  # each device exactly once
    assert sim.kinds().count("wave_started") == 3
    assert [len(sim.in_wave(w)) for w in range(3)] == [4, 16, 20]


def test_gate_failure_with_rollback_policy_rolls_back_updated_devices() -> None:
    sim = Sim(
        plan(on_gate_failure="rollback", waves=[{"percent": 50, "bake_seconds": 600}, {"percent": 100}]), fleet_of(10)
    )
    sim.step()
    wave0 = sim.in_wave(0)
    sim.succeed(wave0[:4])  # four updated, one still downloading
    sim.wave = cohort(errors=100)  # 10 % errors against 0 % in control
    actions, decisions = sim.step(reports=[failed(wave0[4], sim.now)])  # ... and one failed, retry scheduled
    assert sim.status is RolloutStatus.ROLLING_BACK
    gate = next(d for d in decisions if isinstance(d, GateFailed))
    figures = {r.name: (r.verdict.value, r.observed, r.threshold) for r in gate.report.results}
    assert figures["error_rate_increase"] == ("failed", pytest.approx(0.1), 0.01)
    # every device the rollout touched goes back, including the one that failed: its desired state names 2.0
    assert sorted(sim.rolled(actions)) == wave0
    assert all(isinstance(a, Rollback) and a.to_version == "1.0" for a in actions if not isinstance(a, Wait))
    assert not sim.dispatched(actions)
    sim.step(reports=[active(d, "1.0", sim.now) for d in wave0], after=5)
    assert sim.status is RolloutStatus.ROLLED_BACK
    assert {sim.state.devices[d].phase for d in wave0} == {DevicePhase.ROLLED_BACK}
    assert {sim.state.devices[d].phase for d in sim.in_wave(1)} == {DevicePhase.PENDING}  # never touched
    assert sim.kinds()[-1] == "rollback_finished"


def test_rollback_respects_download_limit_and_retries_then_gives_up() -> None:
    sim = Sim(plan(max_concurrent_downloads=2, max_retries=1, retry_backoff_seconds=5), fleet_of(20))
    sim.step()
    sim.run_updates()
    actions, _ = sim.step(commands=[Abort(command_id="a1", rollback=True, reason="bad model")])
    assert len(sim.rolled(actions)) == 2
    first, second = sim.rolled(actions)
    sim.step(reports=[active(first, "1.0", sim.now), failed(second, sim.now, running="2.0")], after=1)
    assert sim.state.devices[second].phase is DevicePhase.ROLLBACK_PENDING
    for _ in range(30):  # the retry waits for its backoff and a free slot
        if sim.state.devices[second].phase is DevicePhase.ROLLING_BACK:
            break
        others = [d for d, r in sim.state.devices.items() if r.phase is DevicePhase.ROLLING_BACK]
        sim.step(reports=[active(d, "1.0", sim.now) for d in others], after=5)
    assert sim.state.devices[second].rollback_attempts == 2
    sim.step(reports=[failed(second, sim.now, running="2.0")], after=1)
    assert sim.state.devices[second].phase is DevicePhase.ROLLBACK_FAILED
    for _ in range(30):
        pending = [d for d, r in sim.state.devices.items() if r.phase is DevicePhase.ROLLING_BACK]
        sim.step(reports=[active(d, "1.0", sim.now) for d in pending], after=1)
    assert sim.status is RolloutStatus.ROLLED_BACK
    assert sim.decisions[-1].model_dump()["failed"] == 1


def test_restart_replays_step_without_dispatching_twice() -> None:
    p = plan(max_concurrent_downloads=3)
    fleet = fleet_of(30)
    state = RolloutState.new("r-restart")
    state, _, _ = step(state, p, Observations(fleet=fleet, wave=cohort(), control=cohort()), T0)
    persisted_json = state.model_dump_json()

    # Killed before persisting the result of a step: the same step on the same state gives the same answer.
    reports = [active(d, "2.0", T0) for d, r in state.devices.items() if r.phase is DevicePhase.DISPATCHED]
    obs = Observations(reports=reports, fleet=fleet, wave=cohort(), control=cohort())
    once = step(RolloutState.model_validate_json(persisted_json), p, obs, T0 + timedelta(seconds=1))
    twice = step(RolloutState.model_validate_json(persisted_json), p, obs, T0 + timedelta(seconds=1))
    assert once == twice

    # Killed after persisting but before publishing: the new state sends nothing new for those devices...
    after, actions, _ = once
    sent = {a.device_id for a in actions if isinstance(a, Dispatch)}
    again, more, _ = step(after, p, obs, T0 + timedelta(seconds=2))
    assert not {a.device_id for a in more if isinstance(a, Dispatch)} & sent
    # ...and the restart republishes exactly the attempts in flight, with the same attempt numbers.
    replay = inflight_actions(after, p)
    assert sorted((a.device_id, a.attempt) for a in replay if isinstance(a, Dispatch)) == sorted(
        (a.device_id, a.attempt) for a in actions if isinstance(a, Dispatch)
    )
    assert again.in_flight() <= p.max_concurrent_downloads


def test_step_does_not_modify_its_input_state() -> None:
    state = RolloutState.new("r")
    before = state.model_dump()
    step(state, plan(), Observations(fleet=fleet_of(5)), T0)
    assert state.model_dump() == before


def test_step_does_not_modify_the_device_records_or_control_cohort_of_its_input() -> None:
    p = plan(waves=[{"percent": 100}], device_timeout_seconds=60, max_retries=1)
    started, _, _ = step(RolloutState.new("r"), p, Observations(fleet=fleet_of(8)), T0)
    state = started.model_copy(update={"last_control": cohort(devices=3)})
    before = state.model_dump()
    # Every attempt times out and is retried, records change, the control cohort is replaced: the input stays as it was.
    after, _, decisions = step(
        state, p, Observations(fleet=fleet_of(8), control=cohort(devices=2)), T0 + timedelta(seconds=61)
    )
    assert any(d.kind == "device_timed_out" for d in decisions) and after.devices != state.devices
    assert state.model_dump() == before


def test_never_more_downloads_in_flight_than_the_limit() -> None:
    sim = Sim(plan(max_concurrent_downloads=3, waves=[{"percent": 100}]), fleet_of(25))
    actions, _ = sim.step()
    assert len(sim.dispatched(actions)) == 3
    while sim.status is RolloutStatus.RUNNING:
        inflight = [d for d, r in sim.state.devices.items() if r.phase is DevicePhase.DISPATCHED]
        assert len(inflight) <= 3
        actions, _ = sim.succeed(inflight[:2])
        assert len(sim.dispatched(actions)) <= 2
    assert sorted(sim.dispatched()) == sorted(sim.fleet)


def test_late_joiner_receives_current_wave() -> None:
    sim = Sim(plan(selector={"tags": {"site": "lab"}}), fleet_of(20, site="lab"))
    sim.step()
    assert sim.state.current_wave == 0
    sim.fleet["newcomer"] = {"site": "lab"}
    sim.fleet["elsewhere"] = {"site": "field"}
    actions, decisions = sim.step(after=1)
    assert sim.state.devices["newcomer"].wave == 0
    assert sim.state.devices["newcomer"].late_joiner
    assert "elsewhere" not in sim.state.devices
    assert "newcomer" in sim.dispatched(actions)
    assert [d.kind for d in decisions] == ["device_joined"]


def test_late_joiner_after_completion_receives_the_rollout() -> None:
    sim = Sim(plan(), fleet_of(10))
    sim.step()
    sim.run_updates()
    assert sim.status is RolloutStatus.COMPLETED
    sim.fleet["latecomer"] = {}
    actions, _ = sim.step(after=3600)
    assert sim.dispatched(actions) == ["latecomer"]
    assert sim.state.devices["latecomer"].wave == 2
    sim.succeed(["latecomer"])
    assert sim.state.devices["latecomer"].phase is DevicePhase.SUCCEEDED
    assert sim.status is RolloutStatus.COMPLETED


def test_partial_plan_does_not_take_in_late_joiners() -> None:
    sim = Sim(plan(waves=[{"count": 2}], allow_partial=True), fleet_of(10))
    sim.step()
    assert len(sim.state.devices) == 2
    sim.fleet["newcomer"] = {}
    sim.step(after=1)
    assert "newcomer" not in sim.state.devices


def test_failed_update_is_retried_with_exponential_backoff_then_given_up() -> None:
    sim = Sim(
        plan(waves=[{"percent": 100}], max_retries=2, retry_backoff_seconds=10, retry_backoff_factor=3),
        {"only": {}},
    )
    sim.step()
    retries: list[datetime] = []
    for _ in range(3):
        _, decisions = sim.step(reports=[failed("only", sim.now)], after=1)
        retries += [d.retry_at for d in decisions if isinstance(d, RetryScheduled)]
        if retries and sim.state.devices["only"].phase is DevicePhase.PENDING:
            assert not sim.dispatched(sim.step(after=(retries[-1] - sim.now).total_seconds() - 0.5)[0])
            assert sim.dispatched(sim.step(after=0.5)[0]) == ["only"]
    record = sim.state.devices["only"]
    assert [(r - T0).total_seconds() for r in retries] == [11, 11 + 1 + 30]  # 10 s, then 30 s after each failure
    assert record.phase is DevicePhase.FAILED
    assert record.attempts == 3
    assert [a.attempt for a in sim.actions if isinstance(a, Dispatch)] == [1, 2, 3]


def test_stale_failure_report_from_an_earlier_attempt_is_ignored() -> None:
    sim = Sim(plan(waves=[{"percent": 100}], retry_backoff_seconds=0), {"dev": {}})
    sim.step()
    first_failure = failed("dev", sim.now)
    sim.step(reports=[first_failure], after=1)  # attempt 1 failed, attempt 2 dispatched at once
    assert sim.state.devices["dev"].attempts == 2
    sim.step(reports=[first_failure], after=1)  # the broker redelivers the old report
    assert sim.state.devices["dev"].phase is DevicePhase.DISPATCHED
    wrong_target = DeviceReport(device_id="dev", at=sim.now, update_phase=UpdatePhase.FAILED, target_version="3.0")
    sim.step(reports=[wrong_target], after=1)
    assert sim.state.devices["dev"].phase is DevicePhase.DISPATCHED


def test_silent_device_times_out_and_is_retried() -> None:
    sim = Sim(plan(waves=[{"percent": 100}], device_timeout_seconds=120, retry_backoff_seconds=30), {"dev": {}})
    actions, _ = sim.step()
    assert Wait(until=T0 + timedelta(seconds=120)) in actions
    _, decisions = sim.step(after=120)
    assert [d.kind for d in decisions] == ["device_timed_out", "retry_scheduled"]
    actions, _ = sim.step(after=30)
    assert [(a.device_id, a.attempt) for a in actions if isinstance(a, Dispatch)] == [("dev", 2)]


def test_device_already_on_target_is_not_sent_it_again() -> None:
    sim = Sim(plan(waves=[{"percent": 100}], max_concurrent_downloads=1), fleet_of(3))
    sim.step()
    idle = [d for d, r in sim.state.devices.items() if r.phase is DevicePhase.PENDING]
    sim.step(reports=[active(idle[0], "2.0", sim.now)])
    assert sim.state.devices[idle[0]].phase is DevicePhase.SUCCEEDED
    sim.run_updates()
    assert idle[0] not in sim.dispatched()


def test_report_from_reported_state() -> None:
    reported = ReportedState(
        device_id="dev",
        active_model=ModelRef(name="digits", version="1.0", sha256=SHA),
        update=UpdateStatus(
            generation=3, phase=UpdatePhase.FAILED, target=ModelRef(name="digits", version="2.0", sha256=SHA)
        ),
        reported_at=T0,
    )
    report = DeviceReport.from_reported(reported)
    assert (report.active_version, report.update_phase, report.target_version, report.at) == (
        "1.0",
        UpdatePhase.FAILED,
        "2.0",
        T0,
    )


def test_insufficient_data_waits_then_pauses_after_max_data_wait() -> None:
    sim = Sim(plan(waves=[{"count": 1, "bake_seconds": 60}, {"percent": 100}], max_data_wait_seconds=600), fleet_of(5))
    sim.wave = cohort(n=50)  # below min_inferences
    sim.step()
    sim.succeed(sim.in_wave(0))
    actions, decisions = sim.step(after=60)
    assert sim.status is RolloutStatus.BAKING
    assert [d.kind for d in decisions] == ["gates_waiting"]  # said once, not silently
    assert Wait(until=sim.now + timedelta(seconds=600)) in actions
    assert sim.step(after=300)[1] == []
    _, decisions = sim.step(after=300)
    assert sim.status is RolloutStatus.PAUSED
    assert [d.kind for d in decisions] == ["gate_inconclusive", "rollout_paused"]
    assert "insufficient data" in (sim.state.reason or "")


def test_final_wave_is_judged_against_the_last_control_cohort_seen() -> None:
    gates = {"max_p95_latency_ratio": 1.25}
    sim = Sim(
        plan(gates=gates, waves=[{"count": 1, "bake_seconds": 0}, {"percent": 100, "bake_seconds": 0}]), fleet_of(3)
    )
    sim.control = cohort(latency_ms=4.0, devices=2)
    sim.step()
    sim.succeed(sim.in_wave(0))
    assert sim.state.current_wave == 1
    sim.control = cohort(devices=0, n=0)  # nobody left on the previous version
    sim.wave = cohort(latency_ms=40.0, devices=3)
    sim.succeed(sim.in_wave(1))
    assert sim.status is RolloutStatus.PAUSED
    failure = next(d for d in sim.decisions if isinstance(d, GateFailed))
    (latency,) = [r for r in failure.report.results if r.name == "p95_latency_ratio"]
    assert latency.reason.endswith("(p95 50 ms vs control 5 ms)")


def test_gate_passed_decision_carries_the_figures() -> None:
    sim = Sim(plan(), fleet_of(10))
    sim.step()
    sim.run_updates()
    passed = [d for d in sim.decisions if isinstance(d, GatePassed)]
    assert len(passed) == 3
    assert {r.name for r in passed[0].report.results} >= {"install_failure_rate", "class_shift_psi"}
    assert all(r.observed is not None for r in passed[0].report.results)


def test_promote_skips_the_bake_and_starts_the_next_wave() -> None:
    sim = Sim(plan(), fleet_of(20))
    sim.step()
    sim.succeed(sim.in_wave(0))
    assert sim.status is RolloutStatus.BAKING
    actions, decisions = sim.step(commands=[Promote(command_id="p1", by="alice")])
    assert [d.kind for d in decisions] == ["wave_promoted", "wave_started"]
    assert "alice" in decisions[0].message
    assert sim.state.current_wave == 1
    assert set(sim.dispatched(actions)) <= set(sim.in_wave(1))


def test_paused_rollout_dispatches_nothing_but_records_results() -> None:
    sim = Sim(plan(waves=[{"percent": 100}], max_concurrent_downloads=2), fleet_of(6))
    first_batch = sim.dispatched(sim.step()[0])
    sim.step(commands=[Pause(command_id="p1")])
    actions, _ = sim.succeed(first_batch)
    assert sim.dispatched(actions) == []
    assert {sim.state.devices[d].phase for d in first_batch} == {DevicePhase.SUCCEEDED}


def test_replayed_command_is_applied_once() -> None:
    sim = Sim(plan(), fleet_of(10))
    sim.step()
    pause = Pause(command_id="same")
    sim.step(commands=[pause])
    sim.step(commands=[Abort(command_id="stop")])
    _, decisions = sim.step(commands=[pause])
    assert decisions == []
    assert sim.status is RolloutStatus.ABORTED


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (Abort(command_id="x", rollback=True), "already rolling_back"),
        (Promote(command_id="y"), "no wave is under way"),
        (Pause(command_id="z"), "cannot pause a rolling_back rollout"),
    ],
)
def test_commands_that_make_no_sense_are_rejected_with_a_reason(command: object, message: str) -> None:
    sim = Sim(plan(), fleet_of(4))
    sim.step()
    sim.step(commands=[Abort(command_id="a", rollback=True)])
    assert sim.status is RolloutStatus.ROLLING_BACK
    _, decisions = sim.step(commands=[command])  # type: ignore[list-item]
    assert [d.kind for d in decisions] == ["command_rejected"]
    assert message in decisions[0].message


def test_rollback_is_refused_without_a_previous_version() -> None:
    sim = Sim(plan(previous_version=None), fleet_of(4))
    sim.step()
    _, decisions = sim.step(commands=[Abort(command_id="a", rollback=True)])
    assert "names no previous_version" in decisions[0].message
    assert sim.status is RolloutStatus.RUNNING


def test_empty_waves_are_skipped_and_an_empty_fleet_completes() -> None:
    sim = Sim(plan(waves=[{"percent": 1}, {"percent": 2}, {"percent": 100}]), fleet_of(3))
    _, decisions = sim.step()
    sim.succeed(sim.in_wave(0))
    sim.step(after=1800)
    assert "wave_skipped" in sim.kinds()
    assert sim.state.current_wave == 2
    empty = Sim(plan(), {})
    _, decisions = empty.step()
    assert empty.status is RolloutStatus.COMPLETED
    assert [d.kind for d in decisions][-1] == "completed"


def test_state_survives_a_json_round_trip_mid_rollout() -> None:
    sim = Sim(plan(), fleet_of(30))
    sim.step()
    sim.succeed(sim.in_wave(0)[:2])
    restored = RolloutState.model_validate_json(sim.state.model_dump_json())
    assert restored == sim.state


def test_naive_time_is_refused() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        step(RolloutState.new("r"), plan(), Observations(), datetime(2025, 1, 1))


def test_per_wave_gates_override_the_plan_gates() -> None:
    strict = GateThresholds(
        max_install_failure_rate=0.0, max_error_rate_increase=None, max_p95_latency_ratio=None, max_psi=None
    )
    sim = Sim(plan(waves=[{"count": 2, "gates": strict.model_dump()}, {"percent": 100}], max_retries=0), fleet_of(10))
    sim.step()
    a, b = sim.in_wave(0)
    sim.step(reports=[active(a, "2.0", sim.now), failed(b, sim.now)])
    assert sim.status is RolloutStatus.PAUSED
    assert "install_failure_rate" in (sim.state.reason or "")
