"""Alerts on a real database (SQLite and PostgreSQL): error rate per cohort, offline devices, stuck rollouts, ack."""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

import cloud.cli.alerts as cli_alerts
from cloud.alerts import evaluate_alerts
from cloud.audit import list_entries
from cloud.auth import Role
from cloud.client import ApiClient
from cloud.models import Alert, Device, Rollout, TelemetryRecord
from cloud.services.tokens import create_token
from cloud.settings import Settings
from protocol.messages import utcnow
from protocol.telemetry import latency_histogram
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api, enrol_for_test

START = utcnow().replace(microsecond=0)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(
        data_dir=tmp_path / "coordinator",
        database_url=database_url,
        alert_group_by="site",
        alert_min_inferences=50,
        alert_resolve_after=2,
        alert_window_s=600,
    )


class Windows:
    """Telemetry windows stored for devices, each with its own seq."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.seq: dict[str, int] = {}

    def add(self, device_id: str, at: datetime, inferences: int, errors: int, latency_ms: float = 2.0) -> None:
        seq = self.seq[device_id] = self.seq.get(device_id, 0) + 1
        with Session(self.engine) as session:
            session.add(
                TelemetryRecord(
                    device_id=device_id,
                    seq=seq,
                    prev_seq=seq - 1 or None,
                    window_start=at - timedelta(seconds=60),
                    window_end=at,
                    model_name="digits",
                    model_version="1.0",
                    inference_count=inferences,
                    error_count=errors,
                    latency_histogram=latency_histogram([latency_ms] * inferences),
                    class_counts={"1": inferences},
                )
            )
            session.commit()


def alerts_of(engine: Engine, rule: str) -> list[Alert]:
    with Session(engine) as session:
        return list(session.exec(select(Alert).where(Alert.rule == rule).order_by(Alert.id)))  # type: ignore[arg-type]


def actions(engine: Engine, subject: str | None = None) -> list[tuple[str, ...]]:
    """Audit entries as (actor, action, subject), or (actor, action) of one `subject`: other rules (devices offline,
    judged at a `now` the test chose) may audit alerts of their own in between."""
    with Session(engine) as session:
        entries = list_entries(session=session, after_seq=0, limit=1000)
    if subject is None:
        return [(e.actor, e.action, e.subject) for e in entries]
    return [(e.actor, e.action) for e in entries if e.subject == subject]


def test_a_high_error_rate_opens_one_alert_for_its_site_until_it_returns_to_normal(
    engine: Engine, settings: Settings
) -> None:
    enrol_for_test(engine, "a1", {"site": "a"})
    enrol_for_test(engine, "b1", {"site": "b"})
    windows = Windows(engine)
    windows.add("a1", START, 200, 1)
    windows.add("b1", START, 100, 30)

    for tick in range(3):  # evaluated again and again while the condition holds: still one alert
        evaluate_alerts(engine=engine, settings=settings, now=START + timedelta(seconds=30 * tick))
    (alert,) = alerts_of(engine, "error_rate")
    assert (alert.cohort, alert.model_name, alert.state, alert.last_value) == ("site=b", "digits", "open", 0.3)
    assert alert.last_seen_at.replace(tzinfo=None) == (START + timedelta(seconds=60)).replace(tzinfo=None)
    assert actions(engine, f"alert:{alert.id}") == [("coordinator", "alert.opened")]

    # Back to normal: the bad window leaves the 10-minute window; one quiet evaluation is not enough (flapping).
    later = START + timedelta(minutes=15)
    windows.add("b1", later, 300, 0)
    evaluate_alerts(engine=engine, settings=settings, now=later)
    assert alerts_of(engine, "error_rate")[0].state == "open"
    evaluate_alerts(engine=engine, settings=settings, now=later + timedelta(seconds=30))
    (resolved,) = alerts_of(engine, "error_rate")
    assert (resolved.state, resolved.open_key) == ("resolved", None)
    assert resolved.resolved_at is not None
    assert actions(engine, f"alert:{alert.id}")[-1] == ("coordinator", "alert.resolved")

    # A new occurrence is a new alert.
    windows.add("b1", later + timedelta(minutes=1), 100, 50)
    evaluate_alerts(engine=engine, settings=settings, now=later + timedelta(minutes=1))
    first, second = alerts_of(engine, "error_rate")
    assert (first.state, second.state, second.cohort) == ("resolved", "open", "site=b")


def test_offline_devices_alert_per_site(engine: Engine, settings: Settings) -> None:
    rows = {
        "gone": ("b", "offline", START - timedelta(hours=2)),
        "unknown": ("b", "unknown", START - timedelta(hours=1)),
        "online": ("b", "online", START - timedelta(hours=2)),  # the session is up; silence alone is not offline
        "blip": ("a", "offline", START - timedelta(seconds=30)),  # offline for less than the threshold
    }
    for device_id, (site, status, seen) in rows.items():
        enrol_for_test(engine, device_id, {"site": site})
        with Session(engine) as session:
            device = session.get(Device, device_id)
            assert device is not None
            device.status, device.last_seen = status, seen
            session.add(device)
            session.commit()
    evaluate_alerts(engine=engine, settings=settings, now=START)
    (alert,) = alerts_of(engine, "devices_offline")
    assert (alert.cohort, alert.model_name, alert.last_value) == ("site=b", None, 2)

    with Session(engine) as session:  # both come back
        for device_id in ("gone", "unknown"):
            device = session.get(Device, device_id)
            assert device is not None
            device.status, device.last_seen = "online", START
            session.add(device)
        session.commit()
    for tick in (1, 2):
        evaluate_alerts(engine=engine, settings=settings, now=START + timedelta(seconds=30 * tick))
    assert [a.state for a in alerts_of(engine, "devices_offline")] == ["resolved"]


def test_a_rollout_that_stopped_advancing_is_stuck(engine: Engine, settings: Settings) -> None:
    hours_ago = START - timedelta(hours=2)
    with Session(engine) as session:
        stuck = Rollout(model_name="digits", model_version="2.0", status="running", updated_at=hours_ago)
        moving = Rollout(model_name="other", model_version="2.0", status="running", updated_at=START)
        paused = Rollout(model_name="third", model_version="2.0", status="paused", updated_at=hours_ago)
        planned = Rollout(  # baking for a day, as its plan says
            model_name="fourth", model_version="2.0", status="baking", updated_at=hours_ago,
            next_step_at=START + timedelta(hours=20),
        )  # fmt: skip
        session.add_all([stuck, moving, paused, planned])
        session.commit()
        stuck_id = stuck.id
    evaluate_alerts(engine=engine, settings=settings, now=START)
    (alert,) = alerts_of(engine, "rollout_stuck")
    assert (alert.cohort, alert.model_name, alert.last_value) == (f"rollout={stuck_id}", "digits", 7200)
    assert "rollout_stuck" in alert.message

    with Session(engine) as session:  # the runner steps it again
        row = session.get(Rollout, stuck_id)
        assert row is not None
        row.updated_at = START + timedelta(seconds=10)
        session.add(row)
        session.commit()
    for tick in (1, 2):
        evaluate_alerts(engine=engine, settings=settings, now=START + timedelta(seconds=30 * tick))
    assert [a.state for a in alerts_of(engine, "rollout_stuck")] == ["resolved"]


def test_operator_lists_shows_and_acks_an_alert_from_the_cli(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    engine = api.coordinator.engine
    enrol_for_test(engine, "b1", {"site": "b"})
    Windows(engine).add("b1", utcnow(), 200, 100)
    evaluate_alerts(engine=engine, settings=api.coordinator.settings, now=utcnow())
    run = in_process_cli(api, monkeypatch)
    client = ApiClient("http://testserver", token=api.coordinator.admin_token, send=api.anonymous.request)
    monkeypatch.setattr(cli_alerts, "connect", lambda *_args, **_kwargs: client)

    (listed,) = ok_json(run("alerts", "list", "--state", "open", "--json"))["data"]
    assert (listed["rule"], listed["cohort"], listed["state"]) == ("error_rate", "device=b1", "open")
    table = run("alerts", "list")
    assert table.exit_code == 0 and "device=b1" in table.stdout and "error_rate" in table.stdout

    acked = ok_json(run("alerts", "ack", str(listed["id"]), "--note", "on it", "--json"))
    assert (acked["state"], acked["acked_by"], acked["ack_note"]) == ("acked", "admin", "on it")
    assert ok_json(run("alerts", "list", "--state", "open", "--json")) == {"data": [], "count": 0}
    assert [a["id"] for a in ok_json(run("alerts", "list", "--state", "acked", "--json"))["data"]] == [listed["id"]]
    shown = run("alerts", "show", str(listed["id"]))
    assert shown.exit_code == 0 and "acknowledged by admin" in shown.stdout and "on it" in shown.stdout
    assert ("admin", "alert.acked", f"alert:{listed['id']}") in actions(engine)

    again = run("alerts", "ack", str(listed["id"]))
    assert again.exit_code == 1 and "acknowledged by admin already" in again.output
    missing = run("alerts", "ack", "999999")
    assert missing.exit_code == 1 and "alert 999999 does not exist" in missing.output

    rules = ok_json(run("alerts", "rules", "--json"))
    assert {r["name"] for r in rules["data"]} == {
        "error_rate", "latency_p95", "devices_offline", "rollout_stuck", "drift", "estimated_accuracy",
        "labelled_accuracy",
    }  # fmt: skip
    # Still evaluated while acked: the acked alert stays the one alert of its condition.
    evaluate_alerts(engine=engine, settings=api.coordinator.settings, now=utcnow())
    assert [a["state"] for a in ok_json(run("alerts", "list", "--state", "all", "--json"))["data"]] == ["acked"]


def test_a_viewer_may_read_alerts_but_not_ack_them(api: Api) -> None:
    engine = api.coordinator.engine
    enrol_for_test(engine, "b1", {"site": "b"})
    Windows(engine).add("b1", utcnow(), 200, 100)
    evaluate_alerts(engine=engine, settings=api.coordinator.settings, now=utcnow())
    with Session(engine) as session:
        secret, _ = create_token(session=session, name="v", role=Role.VIEWER, created_by="test")
    viewer = {"Authorization": f"Bearer {secret}"}
    (alert,) = api.anonymous.get("/api/v1/alerts", headers=viewer).json()["data"]
    refused = api.anonymous.post(f"/api/v1/alerts/{alert['id']}/ack", headers=viewer, json={})
    assert refused.status_code == 403
    assert api.client.get(f"/api/v1/alerts/{alert['id']}").json()["state"] == "open"
    bad: Any = api.client.get("/api/v1/alerts", params={"state": "closed"})
    assert bad.status_code == 422 and bad.json()["field"] == "query.state"
