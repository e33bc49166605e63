"""Helpers of the rollout service tests: a coordinator on a real database with a runner driven by hand.

`RolloutBench` holds an app (no MQTT, no runner thread), a `RolloutRunner` whose publisher records every
desired state, and a fleet of "devices" that answer desired states by reporting through the same ingest
path the MQTT bridge uses, and that send telemetry windows stamped with the test's clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

from fastapi.testclient import TestClient
from sqlmodel import Session, select

from cloud.app import create_app
from cloud.models import RolloutDecisionRecord, RolloutDispatchRecord, TelemetryRecord
from cloud.rollouts.runner import RolloutRunner
from cloud.services.devices import ingest_reported
from cloud.settings import Settings
from protocol.messages import DesiredState, ReportedState, utcnow
from protocol.telemetry import latency_histogram
from tests.cloud.conftest import enrol_for_test

EVEN = {str(c): 10 for c in range(10)}
SHIFTED = {str(c): (60 if c < 2 else 2) for c in range(10)}


@dataclass
class Recorder:
    """A `DesiredStatePublisher` that keeps what it was given."""

    published: list[DesiredState] = field(default_factory=list)
    seen: int = 0

    def publish_desired(self, state: DesiredState) -> None:
        self.published.append(state)

    def new(self) -> list[DesiredState]:
        """States published since the last call."""
        fresh, self.seen = self.published[self.seen :], len(self.published)
        return fresh


class RolloutBench:
    """An app, a hand-driven runner, a clock and simulated devices."""

    def __init__(self, client: TestClient, sha: dict[str, str]) -> None:
        self.client = client
        self.coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {self.coordinator.admin_token}"
        self.recorder = Recorder()
        self.runner = self.new_runner(self.recorder)
        self.coordinator.rollouts = self.runner
        self.sha = sha
        self.now = utcnow()
        self.seq: dict[str, int] = {}
        self.failing: set[str] = set()  # devices whose updates to the new version fail

    def new_runner(self, publisher: Any) -> RolloutRunner:
        return RolloutRunner(
            engine=self.coordinator.engine, publisher=publisher, links=lambda: self.coordinator.links, tick_s=0
        )

    @property
    def auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.coordinator.admin_token}"}

    def report(self, device_id: str, version: str | None, *, tags: dict[str, str], **update: Any) -> None:
        model = {"name": "digits", "version": version, "sha256": self.sha[version]} if version else None
        body: dict[str, Any] = {"device_id": device_id, "tags": tags, "active_model": model}
        if update:
            body["update"] = update
        with Session(self.coordinator.engine) as session:
            ingest_reported(session=session, state=ReportedState.model_validate(body))

    def enrol(
        self, count: int, *, prefix: str = "dev", version: str | None = "1.0", tags: dict[str, str] | None = None
    ) -> list[str]:
        """`count` devices reporting digits `version` (None: serving no model)."""
        ids = [f"{prefix}-{i:02d}" for i in range(count)]
        for device_id in ids:
            enrol_for_test(self.coordinator.engine, device_id, tags or {"site": "lab"})
            self.report(device_id, version, tags=tags or {"site": "lab"})
        return ids

    def create(self, **plan: Any) -> dict[str, Any]:
        body = {"model": "digits", "version": "2.0", "previous_version": "1.0", **plan}
        response = self.client.post("/api/v1/rollouts", json=body, headers=self.auth)
        assert response.status_code == 201, response.text
        return dict(response.json())

    def tick(self, seconds: float = 1.0) -> None:
        """Advance the clock, step the runner, and let devices answer what was published."""
        self.now += timedelta(seconds=seconds)
        self.runner.tick(self.now)
        for state in self.recorder.new():
            self.answer(state)

    def answer(self, state: DesiredState) -> None:
        assert state.model is not None
        device = state.device_id
        tags = {"site": "lab"}
        update = {"generation": state.generation, "phase": "active"}
        if device in self.failing and state.model.version == "2.0":
            failure = {"code": "invalid_model", "message": "warm-up produced NaN"}
            self.report(device, "1.0", tags=tags, generation=state.generation, phase="failed", error=failure)
            return
        self.report(device, state.model.version, tags=tags, **update)

    def telemetry(
        self, device_id: str, version: str, *, n: int = 100, latency_ms: float = 4.0, classes: dict[str, int] = EVEN
    ) -> None:
        seq = self.seq.get(device_id, 0)
        self.seq[device_id] = seq + 1
        counts = {k: v * n // 100 for k, v in classes.items()}
        record = TelemetryRecord(
            device_id=device_id,
            seq=seq,
            window_start=self.now,
            window_end=self.now,
            model_name="digits",
            model_version=version,
            inference_count=n,
            error_count=0,
            latency_histogram=latency_histogram([latency_ms] * n),
            class_counts=counts,
            received_at=self.now,
        )
        with Session(self.coordinator.engine) as session:
            session.add(record)
            session.commit()

    def rollout(self, rollout_id: int) -> dict[str, Any]:
        return dict(self.client.get(f"/api/v1/rollouts/{rollout_id}", params={"decisions": 10_000}).json())

    def decisions(self, rollout_id: int) -> list[RolloutDecisionRecord]:
        with Session(self.coordinator.engine) as session:
            statement = select(RolloutDecisionRecord).where(RolloutDecisionRecord.rollout_id == rollout_id)
            return list(session.exec(statement.order_by(RolloutDecisionRecord.seq)))

    def dispatches(self, rollout_id: int) -> list[RolloutDispatchRecord]:
        with Session(self.coordinator.engine) as session:
            statement = select(RolloutDispatchRecord).where(RolloutDispatchRecord.rollout_id == rollout_id)
            return list(session.exec(statement))

    def versions(self) -> dict[str, str | None]:
        devices = self.client.get("/api/v1/devices").json()["data"]
        return {d["id"]: d["active_model_version"] for d in devices}


def push(client: TestClient, token: str, version: str, content: bytes) -> str:
    response = client.post(
        "/api/v1/models/digits/versions",
        data={"version": version},
        files={"file": ("m.onnx", content, "application/octet-stream")},
        headers={"Authorization": f"Bearer {token}"},
    )
    assert response.status_code == 201, response.text
    return str(response.json()["sha256"])


def bench(database_url: str, tmp_path: Path, model_bytes: bytes, other_bytes: bytes) -> Iterator[RolloutBench]:
    """A `RolloutBench` with digits 1.0 and 2.0 in the registry."""
    settings = Settings(data_dir=tmp_path / "coordinator", database_url=database_url, port=8080, rollout_tick_s=0)
    app = create_app(settings, enable_mqtt=False)
    with TestClient(app) as client:
        token = app.state.coordinator.admin_token
        sha = {"1.0": push(client, token, "1.0", model_bytes), "2.0": push(client, token, "2.0", other_bytes)}
        yield RolloutBench(client, sha)


def first(items: list[Any], kind: str) -> Any:
    return next(i for i in items if i.kind == kind)


def when(start: datetime, seconds: float) -> datetime:
    return start + timedelta(seconds=seconds)
