"""What a device reports cannot freeze its record (clock in the future) nor hide a forged desired state."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from sqlmodel import Session, select
from typer.testing import CliRunner

import cloud.cli as cli
from cloud.models import DeviceEventRecord
from cloud.services.devices import CLOCK_SKEW, GENERATION_AHEAD, generation_anomaly, report_time
from protocol.messages import utcnow
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def device(api: Api, device_id: str) -> dict[str, Any]:
    response = api.client.get(f"/api/v1/devices/{device_id}", headers=api.auth)
    assert response.status_code == 200, response.text
    return dict(response.json())


def security_events(api: Api, device_id: str) -> list[DeviceEventRecord]:
    with Session(api.coordinator.engine) as session:
        statement = select(DeviceEventRecord).where(
            DeviceEventRecord.device_id == device_id, DeviceEventRecord.kind == GENERATION_AHEAD
        )
        return list(session.exec(statement))


# -- reported times from the future ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("reported_at", "counts_as"),
    [
        (NOW - timedelta(hours=1), NOW - timedelta(hours=1)),  # the past is the device's own time
        (NOW + CLOCK_SKEW, NOW + CLOCK_SKEW),  # a clock a little fast is still trusted
        (NOW + CLOCK_SKEW + timedelta(seconds=1), NOW),
        (datetime(2099, 1, 1, tzinfo=UTC), NOW),
    ],
)
def test_reported_time_more_than_the_skew_ahead_counts_as_now(reported_at: datetime, counts_as: datetime) -> None:
    assert report_time(reported_at, NOW) == counts_as


def test_report_from_a_clock_in_2099_does_not_freeze_the_device_record(api: Api) -> None:
    enrol(api.coordinator, "edge-1")
    future = datetime(2099, 1, 1, tzinfo=UTC).isoformat()
    api.report("edge-1", agent_version="1.0.0", reported_at=future)
    assert device(api, "edge-1")["agent_version"] == "1.0.0"
    api.report("edge-1", agent_version="1.0.1", reported_at=(utcnow() + timedelta(seconds=1)).isoformat())
    assert device(api, "edge-1")["agent_version"] == "1.0.1", "an honest report after a future-dated one was ignored"
    api.report("edge-1", agent_version="0.9.0", reported_at=(utcnow() - timedelta(hours=1)).isoformat())
    assert device(api, "edge-1")["agent_version"] == "1.0.1", "a report older than the last one still applies"


# -- a generation the coordinator never issued ----------------------------------------------------------


def test_generation_anomaly_names_both_generations() -> None:
    assert generation_anomaly(7, 7) is None and generation_anomaly(0, 7) is None
    assert generation_anomaly(100, 7) == (
        "reported generation 100 is above the desired 7: it ran a desired state this coordinator never issued"
    )


def test_device_running_a_forged_desired_state_is_flagged_until_it_reports_within_the_desired_again(api: Api) -> None:
    enrol(api.coordinator, "edge-2")
    for _ in range(3):  # reported again and again: flagged once, one security event
        api.report("edge-2", update={"generation": 100, "phase": "active"})
    shown = device(api, "edge-2")
    assert shown["anomaly"] == generation_anomaly(100, 0) and shown["reported_generation"] == 100
    events = security_events(api, "edge-2")
    assert [(e.generation, e.message) for e in events] == [(100, generation_anomaly(100, 0))]

    api.report("edge-2", update={"generation": 0, "phase": "idle"})
    assert device(api, "edge-2")["anomaly"] is None
    assert len(security_events(api, "edge-2")) == 1


def test_devices_list_shows_the_anomaly(monkeypatch: pytest.MonkeyPatch) -> None:
    flagged = {
        "id": "edge-3",
        "status": "online",
        "reported_generation": 100,
        "desired_generation": 7,
        "anomaly": generation_anomaly(100, 7),
    }

    class Client:
        def get(self, path: str, **_params: Any) -> dict[str, Any]:
            assert path == "/devices"
            return {"data": [flagged], "count": 1}

    monkeypatch.setattr(cli.devices, "connect", lambda *_a, **_k: Client())
    result = CliRunner().invoke(cli.build_app(load_plugins=False), ["devices", "list"], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert "anomaly" in result.output and "never issued" in result.output
