"""Property checks of the engine under random fleets, device faults, late joiners and coordinator crashes.

A small service loop drives `step` the way the real one must: persist the state, then execute the
actions. At random it is killed before persisting (the restart re-runs the step), after persisting but
before executing (the restart republishes `inflight_actions`, or — worse — forgets to), and devices
fail, stay silent or join late. Whatever happens: never more downloads in flight than the limit, no
device is sent the same attempt by two different steps, attempts count up one by one, and at the end
no selected device is left behind.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cloud.rollouts import (
    Abort,
    Action,
    Command,
    DevicePhase,
    Dispatch,
    Observations,
    Rollback,
    RolloutPlan,
    RolloutState,
    RolloutStatus,
    inflight_actions,
    step,
)
from cloud.rollouts.inputs import DeviceReport
from tests.cloud.rollouts.sim import T0, active, failed

BEHAVIOURS = ("ok", "flaky", "silent_once")
CRASHES = ("none", "none", "none", "before_persist", "after_persist", "after_persist_forgetful")
NO_GATES = {
    "max_install_failure_rate": None,
    "max_error_rate_increase": None,
    "max_p95_latency_ratio": None,
    "max_psi": None,
}


@dataclass
class Device:
    """A fake device: `flaky` fails its first attempt, `silent_once` never answers its first one."""

    behaviour: str
    answered: set[tuple[str, int]] = field(default_factory=set)

    def answer(self, device_id: str, action: Action, plan: RolloutPlan, now: datetime) -> DeviceReport | None:
        if isinstance(action, Rollback):
            key = ("rollback", action.attempt)
            report = active(device_id, action.to_version, now)
        else:
            assert isinstance(action, Dispatch)
            key = ("update", action.attempt)
            report = active(device_id, plan.version, now)
            if action.attempt == 1 and self.behaviour == "flaky":
                report = failed(device_id, now)
            if action.attempt == 1 and self.behaviour == "silent_once":
                return None
        if key in self.answered:
            return None  # a republished attempt: the device already answered it
        self.answered.add(key)
        return report


@dataclass
class Service:
    """The coordinator loop around `step`, with the crash points of a real process."""

    plan: RolloutPlan
    fleet: dict[str, dict[str, str]]
    devices: dict[str, Device]
    rng: random.Random
    state: RolloutState = field(default_factory=lambda: RolloutState.new("prop"))
    now: datetime = T0
    inbox: list[DeviceReport] = field(default_factory=list)
    delivered: list[Action] = field(default_factory=list)
    sent_by_steps: set[tuple[str, str, int]] = field(default_factory=set)
    commands: list[Command] = field(default_factory=list)

    def deliver(self, actions: list[Action]) -> None:
        for action in actions:
            if isinstance(action, Dispatch | Rollback):
                self.delivered.append(action)
                report = self.devices[action.device_id].answer(action.device_id, action, self.plan, self.now)
                if report is not None:
                    self.inbox.append(report)

    def tick(self) -> None:
        self.now = self.now + timedelta(seconds=self.rng.randint(0, 90))
        obs = Observations(reports=self.inbox, fleet=self.fleet, commands=self.commands)
        new_state, actions, _ = step(self.state, self.plan, obs, self.now)
        crash = self.rng.choice(CRASHES)
        if crash == "before_persist":
            # the restarted coordinator re-reads the same reports and runs the same step
            assert step(self.state, self.plan, obs, self.now) == (new_state, actions, _)
        assert new_state.in_flight() <= self.plan.max_concurrent_downloads
        for action in actions:
            if isinstance(action, Dispatch | Rollback):
                key = (action.kind, action.device_id, action.attempt)
                assert key not in self.sent_by_steps, f"{key} sent by two steps"
                self.sent_by_steps.add(key)
                if isinstance(action, Dispatch):
                    assert new_state.devices[action.device_id].wave <= new_state.current_wave
        self.state, self.inbox, self.commands = new_state, [], []
        if crash == "after_persist":
            self.deliver(inflight_actions(self.state, self.plan))
        elif crash != "after_persist_forgetful":  # forgetful: the actions are lost, timeouts recover
            self.deliver(actions)


def make_service(size: int, behaviours: list[str], limit: int, retries: int, seed: int, bake: float = 30) -> Service:
    plan = RolloutPlan.model_validate(
        {
            "model": "digits",
            "version": "2.0",
            "previous_version": "1.0",
            "waves": [{"percent": 10, "bake_seconds": bake}, {"percent": 50, "bake_seconds": bake}, {"percent": 100}],
            "gates": NO_GATES,
            "max_concurrent_downloads": limit,
            "max_retries": retries,
            "retry_backoff_seconds": 5,
            "device_timeout_seconds": 120,
        }
    )
    fleet: dict[str, dict[str, str]] = {f"dev-{i:02d}": {} for i in range(size)}
    devices = {d: Device(behaviours[i % len(behaviours)]) for i, d in enumerate(fleet)}
    return Service(plan=plan, fleet=fleet, devices=devices, rng=random.Random(seed))


def check_attempts_count_up(service: Service) -> None:
    by_device: dict[tuple[str, str], list[int]] = {}
    for kind, device_id, attempt in sorted(service.sent_by_steps):
        by_device.setdefault((kind, device_id), []).append(attempt)
    for (kind, device_id), attempts in by_device.items():
        assert attempts == list(range(1, len(attempts) + 1)), (kind, device_id, attempts)
        assert len(attempts) <= 1 + service.plan.max_retries


PROPERTY = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@PROPERTY
@given(
    size=st.integers(1, 30),
    behaviours=st.lists(st.sampled_from(BEHAVIOURS), min_size=1, max_size=5),
    limit=st.integers(1, 5),
    retries=st.integers(0, 3),
    joiners=st.integers(0, 3),
    seed=st.integers(0, 2**32),
)
def test_rollout_survives_crashes_faults_and_joiners_without_skipping_or_doubling(
    size: int, behaviours: list[str], limit: int, retries: int, joiners: int, seed: int
) -> None:
    service = make_service(size, behaviours, limit, retries, seed)
    for number in range(3000):
        if number % 7 == 3 and joiners:  # a device enrols mid-rollout
            joiners -= 1
            name = f"late-{joiners}"
            service.fleet[name] = {}
            service.devices[name] = Device(service.rng.choice(BEHAVIOURS))
        service.tick()
        busy = any(r.phase in {DevicePhase.PENDING, DevicePhase.DISPATCHED} for r in service.state.devices.values())
        if service.state.status is RolloutStatus.COMPLETED and not busy and not joiners:
            break
    else:
        raise AssertionError(f"rollout stuck: {service.state.status}")
    check_attempts_count_up(service)
    assert set(service.state.devices) == set(service.fleet)  # late joiners included, nobody skipped
    for device_id, record in service.state.devices.items():
        if record.phase is DevicePhase.FAILED:  # only after every allowed attempt
            assert record.attempts == 1 + retries, (device_id, record)
        else:
            assert record.phase is DevicePhase.SUCCEEDED, (device_id, record)


@PROPERTY
@given(
    size=st.integers(1, 25),
    limit=st.integers(1, 4),
    abort_at=st.integers(0, 40),
    seed=st.integers(0, 2**32),
)
def test_rollback_reaches_every_touched_device_and_only_those(size: int, limit: int, abort_at: int, seed: int) -> None:
    service = make_service(size, list(BEHAVIOURS), limit, 2, seed, bake=0)
    for _ in range(abort_at):
        service.tick()
    touched = {d for d, r in service.state.devices.items() if r.attempts > 0 or r.phase is DevicePhase.SUCCEEDED}
    service.commands = [Abort(command_id="abort", rollback=True)]
    for _ in range(3000):
        service.tick()
        if service.state.status is RolloutStatus.ROLLED_BACK:
            break
    else:
        raise AssertionError(f"rollback stuck: {service.state.status}")
    check_attempts_count_up(service)
    rolled = {d for d, r in service.state.devices.items() if r.phase is DevicePhase.ROLLED_BACK}
    gave_up = {d for d, r in service.state.devices.items() if r.phase is DevicePhase.ROLLBACK_FAILED}
    assert rolled | gave_up == touched
    assert all(service.state.devices[d].rollback_attempts == 3 for d in gave_up)
    untouched = {d for d, r in service.state.devices.items() if d not in touched}
    assert all(service.state.devices[d].phase is DevicePhase.PENDING for d in untouched)
    assert not {a.device_id for a in service.delivered if isinstance(a, Rollback)} & untouched
