"""Labels fed back by local applications: stored with their windows, summed per cohort into labelled accuracy next to
the estimate (API, CLI, HTML report), judged by the `labelled_accuracy` alert rule, and the same after compaction
into drift rollups (both databases)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sqlmodel import Session, col, select

from cloud.alerts.service import configured_rules, evaluate_alerts
from cloud.drift.rollups import compact_drift
from cloud.models import Alert, TelemetryRecord
from cloud.settings import Settings
from cloud.telemetry.windows import ingest_telemetry
from compression.data import load_dataset
from protocol.messages import LabelCounts, ModelRef, utcnow
from simulators.drift import parse_drift
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api
from tests.cloud.drift_helpers import DigitsDevice, digits_profile
from tests.cloud.fleet_helpers import enrol

SITES = {"a-1": "a", "b-1": "b", "c-1": "c"}
LABELLED = {"a-1": 1.0, "b-1": 1.0, "c-1": 0.05}  # share of predictions whose label comes back (c: too few)


@pytest.fixture
def labelled_fleet(api: Api, digits_model_path: Path) -> tuple[Api, dict[str, tuple[int, int]], float]:
    """Three sites serve held-out digits (site b's noisy) and feed labels back; (labelled, correct) per device."""
    profile = digits_profile(digits_model_path)
    assert profile.accuracy is not None
    pushed = api.push("digits", "1.0", digits_model_path.read_bytes(), profile=profile.model_dump_json())
    model = ModelRef(name="digits", version="1.0", sha256=str(pushed["sha256"]))
    session = ort.InferenceSession(str(digits_model_path), providers=["CPUExecutionProvider"])
    data, rng = load_dataset("digits"), np.random.default_rng(7)
    assert data.y is not None
    truth: dict[str, tuple[int, int]] = {}
    for device_id, site in SITES.items():
        enrol(api.coordinator, device_id, tags={"site": site})
        device = DigitsDevice(device_id, session, profile.semantics)
        for _ in range(2):
            picked = rng.choice(len(data.x), 120)
            x = data.x[picked].astype(np.float32)
            if site == "b":
                x = parse_drift("noise=0.5").apply(x, rng).astype(np.float32)
            right_before = device.right
            window = device.window(x, data.y[picked], model=model)
            labelled = int(len(picked) * LABELLED[device_id])
            correct = round((device.right - right_before) * LABELLED[device_id])
            labels = LabelCounts(labelled=labelled, correct=correct, by_class={"0": [labelled, correct]})
            with Session(api.coordinator.engine) as db:
                assert ingest_telemetry(session=db, window=window.model_copy(update={"labels": labels}))
            done = truth.get(device_id, (0, 0))
            truth[device_id] = (done[0] + labelled, done[1] + correct)
    return api, truth, profile.accuracy


def _cohorts(api: Api) -> dict[str, dict[str, object]]:
    body = api.client.get("/api/v1/drift/digits/1.0", params={"by": "site"}, headers=api.auth).json()
    return {c["cohort"]: c for c in body["cohorts"]}


def test_labels_are_stored_and_give_each_site_its_labelled_accuracy_next_to_the_estimate(
    labelled_fleet: tuple[Api, dict[str, tuple[int, int]], float],
) -> None:
    api, truth, reference = labelled_fleet
    with Session(api.coordinator.engine) as session:
        stored = session.exec(select(TelemetryRecord.labels).where(col(TelemetryRecord.device_id) == "a-1")).all()
    assert all(s is not None and s["labelled"] == 120 for s in stored)
    cohorts = _cohorts(api)
    for device_id, site in (("a-1", "site=a"), ("b-1", "site=b")):
        labelled, correct = truth[device_id]
        assert cohorts[site]["labelled"] == labelled
        assert cohorts[site]["labelled_accuracy"] == pytest.approx(correct / labelled)
        assert cohorts[site]["reference_labelled_accuracy"] == pytest.approx(reference)
        assert cohorts[site]["labelled_reason"] is None and cohorts[site]["estimated_accuracy"] is not None
    # The noisy site's labels say what its estimate only suggests: well under the reference.
    assert cohorts["site=b"]["labelled_accuracy_drop"] > 0.05  # type: ignore[operator]
    assert cohorts["site=a"]["labelled_accuracy_drop"] < 0.05  # type: ignore[operator]
    # Too few labels: no figure, and the reason.
    few = cohorts["site=c"]
    assert few["labelled_accuracy"] is None and few["labelled"] == truth["c-1"][0]
    assert "fewer than the 50" in str(few["labelled_reason"])


def test_labelled_accuracy_alert_opens_for_the_site_under_the_reference_only(
    labelled_fleet: tuple[Api, dict[str, tuple[int, int]], float], database_url: str, tmp_path: Path
) -> None:
    api = labelled_fleet[0]
    settings = Settings(data_dir=tmp_path / "s", database_url=database_url, drift_group_by="site")
    assert "labelled_accuracy" in {r.name for r in configured_rules(settings)}
    evaluate_alerts(engine=api.coordinator.engine, settings=settings, now=utcnow())
    with Session(api.coordinator.engine) as session:
        alerts = session.exec(select(Alert).where(Alert.rule == "labelled_accuracy")).all()
    assert [(a.cohort, a.model_name) for a in alerts] == [("site=b", "digits:1.0")]


def test_labelled_accuracy_is_the_same_read_from_drift_rollups(
    labelled_fleet: tuple[Api, dict[str, tuple[int, int]], float],
) -> None:
    api = labelled_fleet[0]
    before = _cohorts(api)
    assert compact_drift(api.coordinator.engine, bucket_s=300).windows == 6
    after = _cohorts(api)
    for site in before:
        for key in ("labelled", "labelled_accuracy", "labelled_reason", "windows", "class_counts"):
            assert after[site][key] == before[site][key], (site, key)


def test_drift_show_report_rules_and_ct_name_labelled_accuracy(
    labelled_fleet: tuple[Api, dict[str, tuple[int, int]], float], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    api = labelled_fleet[0]
    run = in_process_cli(api, monkeypatch)
    shown = run("drift", "show", "digits:1.0", "--by", "site")
    assert shown.exit_code == 0, shown.output
    assert "labelled" in shown.output and "(n=240)" in shown.output
    page = api.client.get("/api/v1/drift/digits/1.0/report?by=site", headers=api.auth).text
    assert "labelled accuracy" in page
    rules = run("alerts", "rules", "--json")
    assert rules.exit_code == 0, rules.output
    assert "labelled_accuracy" in rules.output
    policy = run("ct", "set", "digits", "--on", "labelled_accuracy", "--by", "site")
    assert policy.exit_code == 0, policy.output
    assert ok_json(run("ct", "status", "--json"))["policies"][0]["trigger"] == "labelled_accuracy"
