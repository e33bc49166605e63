"""Counters that can pass 2^31 (telemetry seqs, generations) are 64-bit columns on PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session, select

from cloud.app import create_app
from cloud.models import DeploymentTarget, Device, DeviceEventRecord, RolloutDispatchRecord
from cloud.rollouts import Dispatch, RolloutPlan
from cloud.rollouts.runner import execute_actions
from cloud.services.devices import ingest_event
from cloud.settings import Settings
from cloud.telemetry.windows import ingest_telemetry
from protocol.messages import DeviceEvent
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import api_for, enrol, window

ABOVE_INT32 = 2**31 + 3


@pytest.fixture
def postgres_api(postgres_url: str, tmp_path: Path) -> Iterator[Api]:
    """The coordinator's API on a fresh PostgreSQL database, tables built as the app builds them.

    The rollout runner is off: the test dispatches itself, and a runner tick would race it to attempt 1.
    """
    settings = Settings(data_dir=tmp_path / "c", database_url=postgres_url, port=8080, rollout_tick_s=0)
    app = create_app(settings, enable_mqtt=False)
    with TestClient(app) as client:
        yield api_for(app, client)


def test_seq_and_generations_above_two_to_the_31_are_stored_and_read_back(
    postgres_api: Api, digits_model_bytes: bytes
) -> None:
    api, engine = postgres_api, postgres_api.coordinator.engine
    api.push("digits", "1.0", digits_model_bytes)
    enrol(api.coordinator, "edge-1")
    with Session(engine) as session:
        device = session.get(Device, "edge-1")
        assert device is not None
        device.desired_generation = ABOVE_INT32  # a long-lived device (or a clock-derived generation)
        session.add(device)
        session.commit()
        assert ingest_telemetry(session=session, window=window("edge-1", 2**31 + 5))

    body = {"model": "digits", "version": "1.0", "target": {"device_ids": ["edge-1"]}}
    deployment = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
    assert deployment.status_code == 201, deployment.text
    assert [t["generation"] for t in deployment.json()["targets"]] == [ABOVE_INT32 + 1]

    rollout = api.client.post("/api/v1/rollouts", json={"model": "digits", "version": "1.0"}, headers=api.auth)
    assert rollout.status_code == 201, rollout.text
    dispatch = Dispatch(device_id="edge-1", model="digits", version="1.0", attempt=1)
    with Session(engine, expire_on_commit=False) as session:
        plan = RolloutPlan(model="digits", version="1.0")
        execute_actions(
            session=session, rollout_id=rollout.json()["id"], plan=plan, actions=[dispatch], links=api.coordinator.links
        )
        session.commit()
        event = DeviceEvent(device_id="edge-1", kind="update.started", generation=ABOVE_INT32 + 2)
        ingest_event(session=session, event=event)
    api.report("edge-1", update={"generation": ABOVE_INT32 + 2, "phase": "active"})

    shown = api.client.get("/api/v1/devices/edge-1", headers=api.auth).json()
    assert (shown["desired_generation"], shown["reported_generation"]) == (ABOVE_INT32 + 2, ABOVE_INT32 + 2)
    telemetry = api.client.get("/api/v1/devices/edge-1/telemetry", headers=api.auth).json()["data"]
    assert [w["seq"] for w in telemetry] == [2**31 + 5]
    with Session(engine) as session:
        assert list(session.exec(select(RolloutDispatchRecord.generation))) == [ABOVE_INT32 + 2]
        assert sorted(session.exec(select(DeploymentTarget.generation))) == [ABOVE_INT32 + 1, ABOVE_INT32 + 2]
        events = session.exec(select(DeviceEventRecord.generation).where(DeviceEventRecord.kind == "update.started"))
        assert list(events) == [ABOVE_INT32 + 2]
