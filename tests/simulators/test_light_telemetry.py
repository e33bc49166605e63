"""Light devices' telemetry against a real coordinator process and the fleet's Mosquitto: every window stored once."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import func
from sqlmodel import Session, col, select

from cloud.client import ApiClient
from cloud.db import create_db_engine
from cloud.models import TelemetryRecord
from simulators import CoordinatorProcess
from simulators.light import LightFleet
from tests.services import run_fleet_mosquitto

pytestmark = pytest.mark.e2e

DEVICES = 20
TELEMETRY_S = 1.0


@pytest.fixture
def coordinator(tmp_path: Path, topic_base: str) -> Iterator[tuple[ApiClient, Path]]:
    """`edgefleet up` on SQLite with the fleet's Mosquitto; the client and the database file."""
    data_dir = tmp_path / "coordinator"
    with run_fleet_mosquitto(tmp_path / "broker", data_dir, topic_base) as broker:
        process = CoordinatorProcess(
            data_dir, mqtt_url=broker.url, topic_base=topic_base, extra_args=broker.coordinator_args
        )
        client = process.start()
        try:
            yield client, data_dir / "edgefleet.db"
        finally:
            process.stop()


def _stored(database: Path) -> list[tuple[str, int, int | None]]:
    engine = create_db_engine(f"sqlite:///{database}")
    try:
        with Session(engine) as session:
            query = select(TelemetryRecord.device_id, TelemetryRecord.seq, TelemetryRecord.prev_seq)
            return [tuple(row) for row in session.exec(query).all()]
    finally:
        engine.dispose()


def _count(database: Path) -> int:
    engine = create_db_engine(f"sqlite:///{database}")
    try:
        with Session(engine) as session:
            return int(session.exec(select(func.count(col(TelemetryRecord.id)))).one())
    finally:
        engine.dispose()


def test_light_devices_windows_are_each_stored_exactly_once_in_an_unbroken_chain(
    coordinator: tuple[ApiClient, Path], tmp_path: Path
) -> None:
    client, database = coordinator
    secret = client.post_json("/bootstrap-secrets", {"name": "light", "tags": {"fleet": "light"}})["secret"]
    fleet = LightFleet(
        coordinator_url=client.url,
        bootstrap_secret=secret,
        devices=DEVICES,
        data_root=tmp_path / "light",
        processes=2,
        telemetry_s=TELEMETRY_S,
    )
    fleet.start()
    try:
        time.sleep(4 * TELEMETRY_S)
    finally:
        result = fleet.stop()
    sent = {device_id: figures["windows_sent"] for device_id, figures in result.devices.items()}
    assert sorted(sent) == fleet.device_ids
    assert all(count >= 3 for count in sent.values())
    deadline = time.monotonic() + 30
    while _count(database) < result.windows_sent:
        assert time.monotonic() < deadline, f"{_count(database)}/{result.windows_sent} windows stored in 30 s"
        time.sleep(0.2)
    rows = _stored(database)
    assert len(rows) == result.windows_sent  # none lost, none stored twice
    for device_id, count in sent.items():
        chain = sorted((seq, prev) for d, seq, prev in rows if d == device_id)
        assert len(chain) == count
        assert chain[0][1] is None
        assert all(prev == seq - 1 for seq, prev in chain[1:])
    assert all(len(figures["pubacks"]) == figures["windows_sent"] for figures in result.devices.values())
