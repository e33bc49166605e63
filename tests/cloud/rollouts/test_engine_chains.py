"""Whole state chains of the rollout engine, in table form: one row per step, the status and decisions it yields."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import pytest

from cloud.rollouts import Abort, Pause, Promote, Resume, RolloutPlan, RolloutStatus
from tests.cloud.rollouts.sim import Sim, active, cohort, failed, fleet_of

S = RolloutStatus


@dataclass(frozen=True)
class Row:
    """Do `act` to the sim, then expect `status`, these decision kinds and this many dispatches."""

    act: Callable[[Sim], object]
    status: RolloutStatus
    decisions: list[str]
    dispatches: int = 0


def plan(**fields: object) -> RolloutPlan:
    base = {
        "model": "digits",
        "version": "2.0",
        "previous_version": "1.0",
        "waves": [{"count": 1, "bake_seconds": 60}, {"percent": 100, "bake_seconds": 60}],
        "max_retries": 1,
        "retry_backoff_seconds": 10,
        "device_timeout_seconds": 300,
    }
    return RolloutPlan.model_validate({**base, **fields})


def first(sim: Sim) -> str:
    return sim.in_wave(0)[0]


def rest(sim: Sim) -> list[str]:
    return sim.in_wave(1)


def regress(sim: Sim) -> None:
    sim.wave = cohort(latency_ms=40.0)


HAPPY_PATH = [
    Row(lambda s: s.step(), S.RUNNING, ["rollout_started", "wave_started"], dispatches=1),
    Row(lambda s: s.succeed([first(s)]), S.BAKING, ["device_updated", "bake_started"]),
    Row(lambda s: s.step(after=30), S.BAKING, []),
    Row(lambda s: s.step(after=30), S.RUNNING, ["gate_passed", "wave_started"], dispatches=3),
    Row(lambda s: s.succeed(rest(s)[:2]), S.RUNNING, ["device_updated", "device_updated"]),
    Row(lambda s: s.succeed(rest(s)[2:]), S.BAKING, ["device_updated", "bake_started"]),
    Row(lambda s: s.step(after=60), S.COMPLETED, ["gate_passed", "completed"]),
]

RETRY_THEN_GIVE_UP = [
    Row(lambda s: s.step(), S.RUNNING, ["rollout_started", "wave_started"], dispatches=1),
    Row(lambda s: s.step(reports=[failed(first(s), s.now)], after=1), S.RUNNING, ["retry_scheduled"]),
    Row(lambda s: s.step(after=5), S.RUNNING, []),  # backoff: 10 s
    Row(lambda s: s.step(after=5), S.RUNNING, [], dispatches=1),
    # 1 of 1 installs failed: the install gate fails as soon as the wave is done, no need to bake
    Row(
        lambda s: s.step(after=300),
        S.PAUSED,
        ["device_timed_out", "device_failed", "bake_started", "gate_failed", "rollout_paused"],
    ),
    Row(lambda s: s.step(commands=[Promote(command_id="c1")]), S.RUNNING, ["wave_promoted", "wave_started"], 3),
]

GATE_FAILURE_PAUSES_THEN_RESUME_REBAKES = [
    Row(lambda s: s.step(), S.RUNNING, ["rollout_started", "wave_started"], dispatches=1),
    Row(lambda s: s.succeed([first(s)]), S.BAKING, ["device_updated", "bake_started"]),
    Row(regress, S.BAKING, []),
    Row(lambda s: s.step(after=10), S.PAUSED, ["gate_failed", "rollout_paused"]),
    Row(lambda s: s.step(after=10), S.PAUSED, []),
    Row(lambda s: setattr(s, "wave", cohort()), S.PAUSED, []),
    Row(lambda s: s.step(commands=[Resume(command_id="c1")]), S.BAKING, ["rollout_resumed"]),
    Row(lambda s: s.step(after=59), S.BAKING, []),  # the bake started over at resume
    Row(lambda s: s.step(after=1), S.RUNNING, ["gate_passed", "wave_started"], dispatches=3),
]

GATE_FAILURE_ROLLS_BACK = [
    Row(lambda s: s.step(), S.RUNNING, ["rollout_started", "wave_started"], dispatches=1),
    Row(lambda s: s.succeed([first(s)]), S.BAKING, ["device_updated", "bake_started"]),
    Row(regress, S.BAKING, []),
    Row(lambda s: s.step(after=10), S.ROLLING_BACK, ["gate_failed", "rollback_started"]),
    Row(
        lambda s: s.step(reports=[active(first(s), "1.0", s.now)], after=1),
        S.ROLLED_BACK,
        ["device_rolled_back", "rollback_finished"],
    ),
    Row(lambda s: s.step(after=1000), S.ROLLED_BACK, []),
]

OPERATOR_PAUSE_RESUME_ABORT = [
    Row(lambda s: s.step(commands=[Pause(command_id="c1")]), S.PAUSED, ["rollout_paused"]),
    Row(lambda s: s.step(after=1), S.PAUSED, []),  # the fleet is seen but nothing starts while paused
    Row(
        lambda s: s.step(commands=[Resume(command_id="c2")]),
        S.RUNNING,
        ["rollout_resumed", "rollout_started", "wave_started"],
        1,
    ),
    Row(lambda s: s.step(commands=[Resume(command_id="c3")]), S.RUNNING, ["command_rejected"]),
    Row(lambda s: s.step(commands=[Abort(command_id="c4")]), S.ABORTED, ["rollout_aborted"]),
    Row(lambda s: s.succeed([first(s)]), S.ABORTED, ["device_updated"]),  # facts are still recorded
    Row(
        lambda s: s.step(commands=[Abort(command_id="c5", rollback=True)]),
        S.ROLLING_BACK,
        ["rollout_aborted", "rollback_started"],
    ),
]


@pytest.mark.parametrize(
    ("chain", "fields"),
    [
        (HAPPY_PATH, {}),
        (RETRY_THEN_GIVE_UP, {}),
        (GATE_FAILURE_PAUSES_THEN_RESUME_REBAKES, {}),
        (GATE_FAILURE_ROLLS_BACK, {"on_gate_failure": "rollback"}),
        (OPERATOR_PAUSE_RESUME_ABORT, {}),
    ],
    ids=[
        "happy_path",
        "retry_then_give_up",
        "gate_failure_pauses_then_resume_rebakes",
        "gate_failure_rolls_back",
        "operator_commands",
    ],
)
def test_state_chain(chain: list[Row], fields: dict[str, object]) -> None:
    sim = Sim(plan(**fields), fleet_of(4))
    for number, row in enumerate(chain):
        before = (len(sim.actions), len(sim.decisions))
        row.act(sim)
        new_decisions = sim.kinds(sim.decisions[before[1] :])
        dispatches = len(sim.dispatched(sim.actions[before[0] :]))
        got = (sim.status, new_decisions, dispatches)
        assert got == (row.status, row.decisions, row.dispatches), f"row {number}: {got}"
