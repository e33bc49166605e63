"""`GET /metrics` on a real coordinator and database: who may scrape, and series that follow real actions."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import text
from sqlmodel import Session, create_engine

from cloud.auth import Role
from cloud.metrics import CoordinatorMetrics, FleetReading, families, open_alerts
from cloud.services.tokens import create_token
from cloud.telemetry.windows import ingest_telemetry
from protocol.messages import TelemetryWindow
from protocol.telemetry import latency_histogram
from tests.cloud.conftest import Api

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def samples(exposition: str) -> Samples:
    """Every sample of a text exposition: (name, labels) -> value."""
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(exposition)
        for s in family.samples
    }


def value(scraped: Samples, name: str, **labels: str) -> float | None:
    return scraped.get((name, frozenset(labels.items())))


def by_label(scraped: Samples, name: str, label: str) -> dict[str, float]:
    return {dict(key)[label]: v for (n, key), v in scraped.items() if n == name}


def viewer_token(api: Api) -> str:
    with Session(api.coordinator.engine) as session:
        return create_token(session=session, name="prometheus", role=Role.VIEWER, created_by="test")[0]


def scrape(api: Api) -> Samples:
    response = api.anonymous.get("/metrics", headers={"Authorization": f"Bearer {viewer_token(api)}"})
    assert response.status_code == 200, response.text
    return samples(response.text)


def store_window(api: Api, device_id: str, seq: int, *, count: int, end: datetime) -> bool:
    window = TelemetryWindow(
        device_id=device_id,
        seq=seq,
        window_start=end - timedelta(seconds=10),
        window_end=end,
        inference_count=count,
        error_count=0,
        latency_histogram=latency_histogram([2.0] * count),
        class_counts={"1": count},
    )
    with Session(api.coordinator.engine) as session:
        return ingest_telemetry(session=session, window=window)


@pytest.fixture
def fixed_clock(api: Api) -> None:
    """The app's metrics read the time from NOW (the ingest lag is then exact)."""
    api.client.app.state.metrics = CoordinatorMetrics(api.coordinator, clock=lambda: NOW)  # type: ignore[attr-defined]


def test_scrape_without_a_token_or_with_a_wrong_one_is_refused(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer not-a-token"}):
        refused = api.anonymous.get("/metrics", headers=headers)
        assert refused.status_code == 401
        assert refused.headers["www-authenticate"] == "Bearer"
        assert "edgefleet_devices" not in refused.text


def test_viewer_token_scrapes_the_text_format(api: Api) -> None:
    response = api.anonymous.get("/metrics", headers={"Authorization": f"Bearer {viewer_token(api)}"})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    scraped = samples(response.text)
    assert value(scraped, "edgefleet_database_up") == 1
    assert value(scraped, "edgefleet_coordinator_build_info", version="0.1.0", python=_python()) == 1
    assert (value(scraped, "edgefleet_metrics_database_seconds") or -1) >= 0
    assert value(scraped, "edgefleet_ingest_received_total", channel="telemetry") == 0
    assert value(scraped, "edgefleet_telemetry_ingest_lag_seconds") is None  # no window stored yet


def test_openmetrics_is_served_when_asked_for(api: Api) -> None:
    accept = "application/openmetrics-text; version=1.0.0; charset=utf-8"
    response = api.client.get("/metrics", headers={"Accept": accept})
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.rstrip().endswith("# EOF")


@pytest.mark.usefixtures("fixed_clock")
def test_series_follow_enrolments_reports_telemetry_and_a_rollout(api: Api, digits_model_bytes: bytes) -> None:
    for device_id in ("cam-1", "cam-2", "cam-3", "cam-4"):
        api.enrol(device_id, {"site": "lab"})
    digits = {"name": "digits", "version": "1.0", "sha256": "a" * 64}
    api.report("cam-1", status="online", active_model=digits)
    api.report("cam-2", status="online", active_model=digits)
    api.report("cam-2", status="offline")  # its last will
    api.report("cam-3", status="online", active_model={**digits, "version": "2.0"})
    assert store_window(api, "cam-1", 0, count=7, end=NOW - timedelta(seconds=90))
    assert store_window(api, "cam-1", 1, count=5, end=NOW - timedelta(seconds=42))
    assert not store_window(api, "cam-1", 1, count=5, end=NOW - timedelta(seconds=42))  # a redelivery
    api.push("digits", "1.0", digits_model_bytes)
    created = api.client.post("/api/v1/rollouts", json={"model": "digits", "version": "1.0"})
    assert created.status_code == 201, created.text

    scraped = scrape(api)
    statuses = by_label(scraped, "edgefleet_devices", "status")
    assert statuses == {"online": 2, "offline": 1, "unknown": 0, "never_seen": 1}
    assert value(scraped, "edgefleet_devices_by_model", model="digits", version="1.0") == 2
    assert value(scraped, "edgefleet_devices_by_model", model="digits", version="2.0") == 1
    assert value(scraped, "edgefleet_telemetry_ingest_lag_seconds") == 42  # the newest stored window
    rollouts = by_label(scraped, "edgefleet_rollouts", "status")
    assert sum(rollouts.values()) == 1 and rollouts["pending"] + rollouts["running"] == 1
    assert set(rollouts) >= {"completed", "aborted", "rolled_back"}  # every state, 0 when empty
    assert sum(by_label(scraped, "edgefleet_federated_runs", "status").values()) == 0
    assert not by_label(scraped, "edgefleet_alerts_open", "rule")  # none open (or no table): nothing, no error
    assert not any("cam-" in str(key) for key in scraped)  # never a device id label


def test_ingest_counters_are_exported_per_channel(api: Api) -> None:
    counters = api.coordinator.counters
    for _ in range(3):
        counters.received("telemetry")
    counters.stored("telemetry")
    counters.rejected("unknown", "bad topic")
    counters.duplicate()
    scraped = scrape(api)
    assert value(scraped, "edgefleet_ingest_received_total", channel="telemetry") == 3
    assert value(scraped, "edgefleet_ingest_stored_total", channel="telemetry") == 1
    assert value(scraped, "edgefleet_ingest_rejected_total", channel="unknown") == 1
    assert value(scraped, "edgefleet_ingest_rejected_total", channel="reported") == 0
    assert value(scraped, "edgefleet_ingest_duplicates_total") == 1


def test_decommissioned_devices_leave_the_counts(api: Api) -> None:
    api.enrol("cam-1")
    api.report("cam-1", status="online")
    assert api.client.post("/api/v1/devices/cam-1/decommission").status_code == 200
    assert by_label(scrape(api), "edgefleet_devices", "status")["online"] == 0


@pytest.fixture
def bare_engine(database_url: str) -> Iterator[Session]:
    """A session on an empty database of the test's own (no coordinator tables)."""
    engine = create_engine(database_url)
    with Session(engine) as session:
        yield session
    engine.dispose()


def test_open_alerts_are_counted_by_rule_and_severity_when_the_table_exists(bare_engine: Session) -> None:
    assert open_alerts(bare_engine) == {}  # no table: nothing, and no error
    bare_engine.execute(
        text("CREATE TABLE alert (id INTEGER PRIMARY KEY, rule VARCHAR(64), severity VARCHAR(16), resolved_at TEXT)")
    )
    rows = [(1, "drift", "warning", None), (2, "drift", "warning", None), (3, "drift", "critical", None),
            (4, "errors", "critical", "2026-12-01"), (5, "errors", "critical", None)]  # fmt: skip
    for row in rows:
        bare_engine.execute(
            text("INSERT INTO alert VALUES (:id, :rule, :severity, :resolved)"),
            dict(zip(("id", "rule", "severity", "resolved"), row, strict=True)),
        )
    bare_engine.commit()
    assert open_alerts(bare_engine) == {("drift", "warning"): 2, ("drift", "critical"): 1, ("errors", "critical"): 1}


def test_a_database_that_does_not_answer_still_exports_the_counters() -> None:
    exported = families(FleetReading(ok=False), {"received": {"telemetry": 4}}, mqtt_connected=True, now=NOW)
    names = {family.name for family in exported}
    assert {"edgefleet_database_up", "edgefleet_ingest_received", "edgefleet_mqtt_connected"} <= names
    assert "edgefleet_devices" not in names  # nothing made up
    up = next(f for f in exported if f.name == "edgefleet_database_up")
    assert up.samples[0].value == 0


def _python() -> str:
    import platform

    return platform.python_version()
