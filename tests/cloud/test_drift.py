"""Drift against a version's reference profile: per cohort from the devices' sketches, as API, CLI and alerts, and
the continuous-training policy that turns a drift alert into a federated run (on both databases)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from sqlmodel import Session, select

from cloud.alerts.service import evaluate_alerts
from cloud.ct import service as ct
from cloud.ct.service import CtContext
from cloud.models import Alert, AuditEntry, CtAction, CtPolicyBase
from cloud.settings import Settings
from protocol.messages import ModelRef, utcnow
from protocol.profiles import profile_digest
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api
from tests.cloud.drift_helpers import DigitsDevice, profiled_fleet, send_traffic

SITES = {"a-1": "a", "a-2": "a", "b-1": "b", "b-2": "b", "c-1": "c"}
# Noise moves pixels and confidence alike (the estimated accuracy falls); a rotation would move the pixels too,
# but the model stays confident on rotated digits, which confidence-based estimation cannot see (docs/drift.md).
DRIFT = "noise=0.5:site=b"


@pytest.fixture
def fleet(api: Api, digits_model_path: Path) -> tuple[Api, list[DigitsDevice], ModelRef]:
    devices, model, profile, pushed = profiled_fleet(api, digits_model_path, SITES)
    assert pushed["profile_sha256"] == profile_digest(profile)
    send_traffic(api.coordinator, devices, model=model, drift={d: DRIFT.split(":")[0] for d in ("b-1", "b-2")})
    return api, devices, model


def _by_cohort(body: dict[str, object]) -> dict[str, dict[str, object]]:
    return {c["cohort"]: c for c in body["cohorts"]}  # type: ignore[attr-defined,index]


def test_drift_on_one_site_is_found_there_and_nowhere_else(fleet: tuple[Api, list[DigitsDevice], ModelRef]) -> None:
    api, devices, _ = fleet
    response = api.client.get("/api/v1/drift/digits/1.0", params={"by": "site"}, headers=api.auth)
    assert response.status_code == 200, response.text
    cohorts = _by_cohort(response.json())
    assert set(cohorts) == {"site=a", "site=b", "site=c"}
    assert [k for k, c in cohorts.items() if c["drifted"]] == ["site=b"], response.text[:3000]
    reference = cohorts["site=a"]["reference_accuracy"]
    assert isinstance(reference, float)
    # The drifted site's estimated accuracy drops (its true accuracy does too); the others' stays within 5 points.
    truth = {d.device_id: d.accuracy for d in devices}
    assert reference - cohorts["site=b"]["estimated_accuracy"] > 0.05  # type: ignore[operator]
    assert max(truth["b-1"], truth["b-2"]) < reference - 0.05
    for site in ("site=a", "site=c"):
        assert abs(cohorts[site]["estimated_accuracy"] - reference) < 0.05  # type: ignore[operator]
    assert any("KS" in r for r in cohorts["site=b"]["reasons"])  # type: ignore[attr-defined]


def test_drift_by_device_and_for_the_whole_fleet(fleet: tuple[Api, list[DigitsDevice], ModelRef]) -> None:
    api, _, _ = fleet
    per_device = _by_cohort(api.client.get("/api/v1/drift/digits/1.0?by=device", headers=api.auth).json())
    assert {k for k, c in per_device.items() if c["drifted"]} == {"device=b-1", "device=b-2"}
    whole = api.client.get("/api/v1/drift/digits/1.0", headers=api.auth).json()
    assert [c["cohort"] for c in whole["cohorts"]] == ["fleet"] and whole["cohorts"][0]["devices"] == sorted(SITES)


def test_drift_report_page_is_self_contained(fleet: tuple[Api, list[DigitsDevice], ModelRef]) -> None:
    api, _, _ = fleet
    page = api.client.get("/api/v1/drift/digits/1.0/report?by=site", headers=api.auth)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "site=b" in page.text and "DRIFTED" in page.text and "<svg" in page.text
    assert "<script" not in page.text and "http://" not in page.text.replace("http://www.w3.org/2000/svg", "")


def test_drift_of_a_version_without_profile_says_how_to_get_one(api: Api, digits_model_bytes: bytes) -> None:
    api.push("digits", "2.0", digits_model_bytes)
    response = api.client.get("/api/v1/drift/digits/2.0", headers=api.auth)
    assert response.status_code == 404 and "--profile" in response.text
    assert api.client.get("/api/v1/drift/nomodel/1.0", headers=api.auth).status_code == 404


def test_a_profile_that_is_not_one_is_refused_and_nothing_is_stored(api: Api, digits_model_bytes: bytes) -> None:
    bad = api.client.post(
        "/api/v1/models/digits/versions",
        data={"version": "3.0", "profile": json.dumps({"rows": "many"})},
        files={"file": ("m.onnx", digits_model_bytes, "application/octet-stream")},
        headers=api.auth,
    )
    assert bad.status_code == 422 and "profile" in bad.text
    assert api.client.get("/api/v1/models/digits", headers=api.auth).status_code == 404


def test_a_drifted_site_raises_one_drift_alert_and_the_other_sites_none(
    fleet: tuple[Api, list[DigitsDevice], ModelRef], database_url: str, tmp_path: Path
) -> None:
    api = fleet[0]
    settings = Settings(data_dir=tmp_path / "s", database_url=database_url, drift_group_by="site")
    for _ in range(2):  # a second evaluation keeps the one alert
        evaluate_alerts(engine=api.coordinator.engine, settings=settings, now=utcnow())
    with Session(api.coordinator.engine) as session:
        alerts = session.exec(select(Alert).where(Alert.resolved_at == None)).all()  # noqa: E711
        drift = [(a.rule, a.cohort, a.model_name) for a in alerts if a.rule in ("drift", "estimated_accuracy")]
    assert sorted(drift) == [("drift", "site=b", "digits:1.0"), ("estimated_accuracy", "site=b", "digits:1.0")]


def test_ct_policy_turns_a_drift_alert_into_a_turn_that_waits_then_says_why_it_cannot_train(
    fleet: tuple[Api, list[DigitsDevice], ModelRef], database_url: str, tmp_path: Path
) -> None:
    api, _, _ = fleet
    engine = api.coordinator.engine
    # The settings group drift by nothing but the fleet: the policy's `by` is what makes site cohorts.
    settings = Settings(data_dir=tmp_path / "s", database_url=database_url)
    context = CtContext(flower_enabled=False, data_dir=tmp_path, nodes=lambda *a, **k: set())
    with Session(engine) as session:
        ct.set_policy(
            session=session, body=CtPolicyBase(model_name="digits", by="site", wait_for="retrain"), actor="alice"
        )
    evaluate_alerts(engine=engine, settings=settings, now=utcnow())
    with Session(engine, expire_on_commit=False) as session:
        ct.step(session=session, context=context)
        ct.step(session=session, context=context)  # a second tick starts nothing more
        [action] = session.exec(select(CtAction)).all()
    assert (action.cohort, action.version, action.status) == ("site=b", "1.0", "awaiting_retrain")
    with Session(engine, expire_on_commit=False) as session:
        done = ct.approve_action(session=session, action_id=action.id or 0, actor="bob", context=context)
        assert done.status == "failed" and "not enabled" in done.detail and done.approved_by == "bob"
        actions = [e.action for e in session.exec(select(AuditEntry)) if e.action.startswith("ct.")]
    assert actions == ["ct.policy_set", "ct.awaiting_retrain", "ct.failed"]


def test_ct_and_drift_commands(
    fleet: tuple[Api, list[DigitsDevice], ModelRef], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api, _, _ = fleet
    run = in_process_cli(api, monkeypatch)
    shown = run("drift", "show", "digits:1.0", "--by", "site")
    assert shown.exit_code == 0, shown.output
    assert "site=b" in shown.output and "DRIFTED" in shown.output
    out = tmp_path / "drift.html"
    report = run("drift", "report", "digits:1.0", "--by", "site", "-o", str(out))
    assert report.exit_code == 0, report.output
    assert "site=b" in out.read_text()
    bad = run("drift", "show", "digits")
    assert bad.exit_code == 1 and "MODEL:VERSION" in bad.output
    policy = run("ct", "set", "digits", "--on", "drift", "--by", "site", "--rounds", "2", "--wait-for", "retrain")
    assert policy.exit_code == 0, policy.output
    status = ok_json(run("ct", "status", "--json"))
    assert status["policies"][0]["rounds"] == 2 and status["policies"][0]["wait_for"] == "retrain"
    assert run("ct", "set", "digits", "--on", "weather").exit_code != 0
