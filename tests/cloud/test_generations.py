"""Generations are assigned atomically: deployments through the API racing rollout steps on the same devices."""

from __future__ import annotations

import functools
import threading
from collections import defaultdict
from collections.abc import Callable

import pytest
from sqlmodel import Session, select

from cloud.models import DeploymentTarget, Device, RolloutDispatchRecord, TargetStatus
from cloud.rollouts import Dispatch, RolloutPlan
from cloud.rollouts.runner import execute_actions
from protocol.messages import DesiredState
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol

DEVICES = ["gen-a", "gen-b", "gen-c"]
THREADS = 3  # of each kind
ROUNDS = 6  # per thread


def _race(workers: list[Callable[[], None]]) -> list[BaseException]:
    """Run every worker in its own thread, all released at once; the exceptions they raised."""
    start, errors = threading.Barrier(len(workers)), []

    def run(work: Callable[[], None]) -> None:
        start.wait()
        try:
            work()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(work,)) for work in workers]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    return errors


def test_deployments_racing_rollout_steps_issue_every_generation_exactly_once(
    api: Api, digits_model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    api.push("digits", "1.0", digits_model_bytes)
    for device_id in DEVICES:
        enrol(api.coordinator, device_id)
    # The steps below are the rollout's only steps: the coordinator's own runner would dispatch attempt 1 of the
    # same rollout at its next tick (and publish it before `published` listens), racing the threads' attempt 1.
    assert api.coordinator.rollouts is not None
    api.coordinator.rollouts.stop()
    rollout = api.client.post("/api/v1/rollouts", json={"model": "digits", "version": "1.0"}, headers=api.auth)
    assert rollout.status_code == 201, rollout.text
    rollout_id, plan = rollout.json()["id"], RolloutPlan(model="digits", version="1.0")
    published: list[DesiredState] = []
    monkeypatch.setattr(api.coordinator, "publish_desired", published.append)

    def deploy() -> None:  # `edgefleet deploy` to the same devices, again and again
        body = {"model": "digits", "version": "1.0", "target": {"device_ids": DEVICES}}
        for _ in range(ROUNDS):
            response = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
            assert response.status_code == 201, response.text

    def step(thread: int) -> None:  # what a rollout step persists (then publishes) for its dispatches
        for round_ in range(ROUNDS):
            actions = [
                Dispatch(device_id=d, model="digits", version="1.0", attempt=thread * 100 + round_) for d in DEVICES
            ]
            with Session(api.coordinator.engine, expire_on_commit=False) as session:
                states = execute_actions(
                    session=session, rollout_id=rollout_id, plan=plan, actions=actions, links=api.coordinator.links
                )
                session.commit()
            published.extend(states)

    errors = _race([deploy] * THREADS + [functools.partial(step, t) for t in range(THREADS)])
    assert errors == []

    issued = 2 * THREADS * ROUNDS
    by_device: dict[str, list[int]] = defaultdict(list)
    for state in published:
        by_device[state.device_id].append(state.generation)
    with Session(api.coordinator.engine) as session:
        for device_id in DEVICES:
            assert sorted(by_device[device_id]) == list(range(1, issued + 1)), f"{device_id}: a generation issued twice"
            targets = session.exec(
                select(DeploymentTarget.generation).where(
                    DeploymentTarget.device_id == device_id, DeploymentTarget.status != TargetStatus.FAILED.value
                )
            )
            assert sorted(targets) == list(range(1, issued + 1))
            dispatched = list(
                session.exec(
                    select(RolloutDispatchRecord.generation).where(RolloutDispatchRecord.device_id == device_id)
                )
            )
            assert len(dispatched) == THREADS * ROUNDS == len(set(dispatched))
            stored = session.get(Device, device_id)
            assert stored is not None and stored.desired_state is not None
            assert stored.desired_generation == stored.desired_state["generation"] == issued
