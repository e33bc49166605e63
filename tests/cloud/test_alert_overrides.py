"""Alert rules per model: an operator switches a rule off for one model, or gives it a threshold of its own, through
the API and the CLI; the evaluation on a real database follows (model over fleet-wide over settings), and every
change is audited."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from cloud.alerts import evaluate_alerts
from cloud.alerts.rules import ANY_MODEL, Rule, RuleOverride, effective_rule
from cloud.audit import list_entries
from cloud.auth import Role
from cloud.models import Alert, TelemetryRecord
from cloud.services.tokens import create_token
from cloud.settings import Settings
from protocol.messages import utcnow
from protocol.telemetry import latency_histogram
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api, enrol_for_test

NOW = utcnow().replace(microsecond=0)


@pytest.fixture
def settings(tmp_path: Path, database_url: str) -> Settings:
    return Settings(data_dir=tmp_path / "s", database_url=database_url, alert_group_by="site", alert_min_inferences=50)


def add_window(engine: Engine, device_id: str, model: str, *, inferences: int, errors: int, seq: int = 1) -> None:
    """One telemetry window of `model` from `device_id`, ending now."""
    with Session(engine) as session:
        session.add(
            TelemetryRecord(
                device_id=device_id, seq=seq, prev_seq=seq - 1 or None, window_start=NOW - timedelta(seconds=60),
                window_end=NOW, model_name=model, model_version="1.0", inference_count=inferences,
                error_count=errors, latency_histogram=latency_histogram([2.0] * inferences),
                class_counts={"1": inferences},
            )
        )  # fmt: skip
        session.commit()


def open_error_alerts(engine: Engine) -> list[tuple[str, str | None, float]]:
    with Session(engine) as session:
        rows = session.exec(select(Alert).where(Alert.rule == "error_rate", Alert.state == "open"))
        return sorted((a.cohort, a.model_name, a.threshold) for a in rows)


def rule_actions(engine: Engine) -> list[tuple[str, str, str]]:
    with Session(engine) as session:
        entries = list_entries(session=session, after_seq=0, limit=1000)
        return [(e.actor, e.action, e.subject) for e in entries if e.action.startswith("alert.rule_")]


def test_a_rule_switched_off_for_one_model_raises_nothing_for_it_while_another_model_still_alerts(
    api: Api, settings: Settings
) -> None:
    engine = api.coordinator.engine
    enrol_for_test(engine, "b1", {"site": "b"})
    add_window(engine, "b1", "digits", inferences=100, errors=30)
    add_window(engine, "b1", "mnist", inferences=100, errors=30, seq=2)
    off = api.client.put("/api/v1/alerts/rules/error_rate", params={"model": "digits"}, json={"enabled": False})
    assert off.status_code == 200, off.text

    evaluate_alerts(engine=engine, settings=settings, now=NOW)
    assert open_error_alerts(engine) == [("site=b", "mnist", 0.05)]
    assert rule_actions(engine) == [("admin", "alert.rule_set", "alert_rule:error_rate:digits")]

    # Fleet-wide off, and digits switched back on: digits alerts (its own word wins), mnist no longer opens.
    assert api.client.put("/api/v1/alerts/rules/error_rate", json={"enabled": False}).status_code == 200
    assert api.client.put("/api/v1/alerts/rules/error_rate?model=digits", json={"enabled": True}).status_code == 200
    with Session(engine) as session:
        for alert in session.exec(select(Alert)):
            session.delete(alert)
        session.commit()
    evaluate_alerts(engine=engine, settings=settings, now=NOW)
    assert open_error_alerts(engine) == [("site=b", "digits", 0.05)]


def test_a_stricter_threshold_for_one_model_raises_an_alert_the_default_would_not(api: Api, settings: Settings) -> None:
    engine = api.coordinator.engine
    enrol_for_test(engine, "a1", {"site": "a"})
    add_window(engine, "a1", "digits", inferences=200, errors=6)  # 3 %: under the default 5 %
    add_window(engine, "a1", "mnist", inferences=200, errors=6, seq=2)
    evaluate_alerts(engine=engine, settings=settings, now=NOW)
    assert open_error_alerts(engine) == []

    set_ = api.client.put("/api/v1/alerts/rules/error_rate?model=digits", json={"threshold": 0.01})
    assert set_.status_code == 200, set_.text
    evaluate_alerts(engine=engine, settings=settings, now=NOW + timedelta(seconds=30))
    assert open_error_alerts(engine) == [("site=a", "digits", 0.01)]  # mnist keeps the default: no alert

    # Reset: the settings' threshold again; the alert resolves like any quiet condition, and both are audited.
    reset = api.client.delete("/api/v1/alerts/rules/error_rate", params={"model": "digits"})
    assert reset.status_code == 200, reset.text
    for tick in range(1, settings.alert_resolve_after + 1):
        evaluate_alerts(engine=engine, settings=settings, now=NOW + timedelta(seconds=30 + 30 * tick))
    assert open_error_alerts(engine) == []
    assert rule_actions(engine) == [
        ("admin", "alert.rule_set", "alert_rule:error_rate:digits"),
        ("admin", "alert.rule_reset", "alert_rule:error_rate:digits"),
    ]


def test_rules_show_effective_values_and_where_they_come_from(api: Api) -> None:
    assert api.client.put("/api/v1/alerts/rules/latency_p95", json={"threshold": 250}).status_code == 200
    body = api.client.put("/api/v1/alerts/rules/latency_p95?model=digits", json={"enabled": False}).json()
    [latency] = [r for r in body["data"] if r["name"] == "latency_p95"]
    assert (latency["threshold"], latency["threshold_from"], latency["settings_threshold"]) == (250, "*", 500)
    assert (latency["enabled"], latency["enabled_from"]) == (True, "settings")
    [digits] = latency["models"]
    assert (digits["model"], digits["enabled"], digits["enabled_from"]) == ("digits", False, "model")
    assert (digits["threshold"], digits["threshold_from"], digits["updated_by"]) == (250, "*", "admin")
    [errors] = [r for r in api.client.get("/api/v1/alerts/rules").json()["data"] if r["name"] == "error_rate"]
    assert (errors["threshold_from"], errors["enabled_from"], errors["models"]) == ("settings", "settings", [])


def test_bad_rule_changes_are_refused_with_the_reason_and_change_nothing(api: Api) -> None:
    unknown = api.client.put("/api/v1/alerts/rules/errors?model=digits", json={"threshold": 0.1})
    assert unknown.status_code == 404 and "error_rate" in unknown.text and "latency_p95" in unknown.text
    bad = api.client.put("/api/v1/alerts/rules/error_rate?model=digits", json={"threshold": 1.5})
    assert bad.status_code == 422 and "between 0 and 1" in bad.text
    empty = api.client.put("/api/v1/alerts/rules/error_rate?model=digits", json={})
    assert empty.status_code == 422 and "threshold" in empty.text
    drift = api.client.put("/api/v1/alerts/rules/drift?model=digits", json={"threshold": 2})
    assert drift.status_code == 422 and "--off" in drift.text
    offline = api.client.put("/api/v1/alerts/rules/devices_offline?model=digits", json={"enabled": False})
    assert offline.status_code == 422 and "not judged per model" in offline.text
    nothing = api.client.delete("/api/v1/alerts/rules/error_rate?model=digits")
    assert nothing.status_code == 404 and "no override" in nothing.text
    with Session(api.coordinator.engine) as session:
        viewer, _ = create_token(session=session, name="v", role=Role.VIEWER, created_by="test")
    as_viewer = {"Authorization": f"Bearer {viewer}"}
    refused = api.anonymous.put("/api/v1/alerts/rules/error_rate", headers=as_viewer, json={"enabled": False})
    assert refused.status_code == 403
    assert api.anonymous.delete("/api/v1/alerts/rules/error_rate", headers=as_viewer).status_code == 403
    assert api.anonymous.get("/api/v1/alerts/rules", headers=as_viewer).status_code == 200
    rules = api.client.get("/api/v1/alerts/rules").json()["data"]
    assert all(r["models"] == [] and r["enabled"] and r["threshold_from"] == "settings" for r in rules)
    assert rule_actions(api.coordinator.engine) == []


def test_operator_sets_and_resets_rules_from_the_cli(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    run = in_process_cli(api, monkeypatch)
    ok_json(run("alerts", "rules", "set", "error_rate", "--model", "digits", "--threshold", "0.02", "--json"))
    body = ok_json(run("alerts", "rules", "set", "latency_p95", "--off", "--json"))
    [latency] = [r for r in body["data"] if r["name"] == "latency_p95"]
    assert (latency["enabled"], latency["enabled_from"]) == (False, "*")
    shown = run("alerts", "rules")
    assert shown.exit_code == 0, shown.output
    assert "model override" in shown.stdout and "fleet override" in shown.stdout and "OFF" in shown.stdout
    assert "digits" in shown.stdout and "> 0.02" in shown.stdout
    reset = ok_json(run("alerts", "rules", "reset", "error_rate", "--model", "digits", "--json"))
    assert [r["models"] for r in reset["data"] if r["name"] == "error_rate"] == [[]]
    assert run("alerts", "rules", "set", "error_rate").exit_code == 1
    both = run("alerts", "rules", "set", "error_rate", "--off", "--on")
    assert both.exit_code == 1 and "not both" in both.output
    missing = run("alerts", "rules", "reset", "nosuchrule")
    assert missing.exit_code == 1 and "error_rate" in missing.output


RULE = Rule(name="error_rate", metric="error_rate", threshold=0.05)


@pytest.mark.parametrize(
    ("overrides", "model", "expected"),
    [
        ([], "digits", (True, "settings", 0.05, "settings")),
        ([RuleOverride("error_rate", ANY_MODEL, enabled=False)], "digits", (False, "*", 0.05, "settings")),
        (
            [RuleOverride("error_rate", ANY_MODEL, False, 0.2), RuleOverride("error_rate", "digits", enabled=True)],
            "digits:1.0",  # a drift alert's model: name:version
            (True, "model", 0.2, "*"),
        ),
        ([RuleOverride("error_rate", "mnist", threshold=0.01)], "digits", (True, "settings", 0.05, "settings")),
        ([RuleOverride("latency_p95", "digits", enabled=False)], "digits", (True, "settings", 0.05, "settings")),
        ([RuleOverride("error_rate", "digits", threshold=0.01)], None, (True, "settings", 0.05, "settings")),
    ],
)
def test_effective_rule_takes_the_model_over_the_fleet_over_the_settings(
    overrides: list[RuleOverride], model: str | None, expected: tuple[bool, str, float, str]
) -> None:
    effective = effective_rule(RULE, model, overrides)
    assert (effective.enabled, effective.enabled_from, effective.rule.threshold, effective.threshold_from) == expected
