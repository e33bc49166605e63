"""Fixtures of the coordinator tests: an app on a real database, and helpers to feed it device messages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session

from cloud.app import create_app
from cloud.coordinator import Coordinator
from cloud.models import Device, EnrolmentState
from cloud.services.devices import ingest_reported
from cloud.settings import Settings
from protocol.messages import ReportedState
from tests.cloud.cards_helpers import migrated_engine


class Api:
    """A TestClient on a running coordinator sending its admin token, and one (`anonymous`) that sends none."""

    def __init__(self, client: TestClient, coordinator: Coordinator, anonymous: TestClient) -> None:
        self.client = client
        self.coordinator = coordinator
        self.anonymous = anonymous

    def enrol(self, device_id: str, tags: dict[str, str] | None = None) -> None:
        """Make `device_id` an enrolled device (as a completed enrolment would; the certificate is not needed here)."""
        enrol_for_test(self.coordinator.engine, device_id, tags)

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.coordinator.admin_token}"}

    def push(self, name: str, version: str, content: bytes, **fields: str) -> dict[str, object]:
        response = self.client.post(
            f"/api/v1/models/{name}/versions",
            data={"version": version, **fields},
            files={"file": ("model.onnx", content, "application/octet-stream")},
            headers=self.auth,
        )
        assert response.status_code == 201, response.text
        return dict(response.json())

    def report(self, device_id: str, **fields: object) -> None:
        """Ingest a reported state as the bridge would; a device the fleet does not know yet is enrolled first,
        with the reported tags as its enrolment tags (tags a device reports later are ignored)."""
        tags = fields.get("tags")
        enrol_for_test(self.coordinator.engine, device_id, dict(tags) if isinstance(tags, dict) else None, keep=True)
        with Session(self.coordinator.engine) as session:
            ingest_reported(session=session, state=ReportedState.model_validate({"device_id": device_id, **fields}))


@pytest.fixture
def engine(database_url: str) -> Iterator[Engine]:
    """A database migrated to head (as a coordinator runs it), SQLite and PostgreSQL."""
    with migrated_engine(database_url) as engine:
        yield engine


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    """The coordinator's API on SQLite or PostgreSQL, without MQTT."""
    settings = Settings(
        data_dir=tmp_path / "coordinator",
        database_url=database_url,
        port=8080,
        device_mqtt_url="mqtts://broker.test:8883",  # no broker runs here; enrolment answers still name one
        # No background alert or continuous-training ticks: tests call them when they mean to (no stray audit entries).
        alert_tick_s=0,
        ct_tick_s=0,
        drift_rollup_tick_s=0,
    )
    app = create_app(settings, enable_mqtt=False)
    with TestClient(app) as client:
        coordinator = app.state.coordinator
        client.headers["Authorization"] = f"Bearer {coordinator.admin_token}"
        yield Api(client, coordinator, TestClient(app))


def enrol_for_test(engine: Engine, device_id: str, tags: dict[str, str] | None, *, keep: bool = False) -> None:
    """An enrolled device row (`keep`: leave an existing device as it is)."""
    with Session(engine) as session:
        device = session.get(Device, device_id)
        if device is not None and keep:
            return
        device = device or Device(id=device_id)
        device.enrolment = EnrolmentState.ENROLLED.value
        device.tags = dict(tags or device.tags or {})
        session.add(device)
        session.commit()
