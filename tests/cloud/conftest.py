"""Fixtures of the coordinator tests: an app on a real database, and helpers to feed it device messages."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlmodel import Session

from cloud.app import create_app
from cloud.coordinator import Coordinator
from cloud.services import ingest_reported
from cloud.settings import Settings
from protocol.messages import ReportedState


class Api:
    """A TestClient on a running coordinator, with its admin token at hand."""

    def __init__(self, client: TestClient, coordinator: Coordinator) -> None:
        self.client = client
        self.coordinator = coordinator

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
        """Ingest a reported state as the bridge would (enrols the device)."""
        with Session(self.coordinator.engine) as session:
            ingest_reported(session=session, state=ReportedState.model_validate({"device_id": device_id, **fields}))


@pytest.fixture
def api(database_url: str, tmp_path: Path) -> Iterator[Api]:
    """The coordinator's API on SQLite or PostgreSQL, without MQTT."""
    settings = Settings(data_dir=tmp_path / "coordinator", database_url=database_url, port=8080)
    app = create_app(settings, enable_mqtt=False)
    with TestClient(app) as client:
        yield Api(client, app.state.coordinator)
