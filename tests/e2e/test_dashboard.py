"""The dashboard at `/ui/` in a real browser (Playwright driving Debian's chromium) on a real coordinator process and a
simulated fleet of real agents with a real rollout in flight.

Every page is loaded with a viewer token and with an operator token; each load records the browser's console errors
and every request it makes (all must go to the coordinator on 127.0.0.1), checks that the page fits a 1366 px wide
laptop screen without scrolling sideways and that every status it shows is written out (a symbol and a word, not a
colour alone), and saves a screenshot under `test-output/dashboard/` at the repository root (gitignored) for a person
to look at.
"""

from __future__ import annotations

import json
import platform
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from sqlalchemy import create_engine
from sqlmodel import Session
from typer.testing import CliRunner

from cloud import cli
from cloud.client import ApiClient
from cloud.models import FederatedRun
from compression.data import load_dataset
from compression.profile import build_profile
from compression.reference import load_digits_split
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet, parse_drift
from tests.e2e.clients import enrol_device
from tests.e2e.dashboard_helpers import Visit, chromium, signing_in

pytestmark = pytest.mark.e2e

GROUP = {"group": "ui"}
# One gate, too generous to ever stop the rollout, so its page shows a gate's figures against its threshold; judged on
# GATE_ROWS inferences of each cohort (the updated device and the control devices serve them after the bake began).
GATE_ROWS = 50
GATES = {
    "max_install_failure_rate": None,
    "max_error_rate_increase": 0.5,
    "max_p95_latency_ratio": None,
    "max_psi": None,
    "min_inferences": GATE_ROWS,
}
SPARE = {"group": "spare"}  # enrolled devices that never connect: offline
ROWS_PER_DEVICE = 200  # the coordinator's drift_min_rows: each device's cohort gets a verdict


def wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `condition` until it holds; fail the test with `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.1)


@dataclass
class Scene:
    """A coordinator with a fleet on 1.0 (profiled: its telemetry carries drift sketches; two devices see rotated
    digits, so their cohorts drift and an alert is open for each), a rollout to 2.0 baking its first wave, and one
    token per role."""

    admin: ApiClient
    fleet: SimulatedFleet
    rollout_id: int
    tokens: dict[str, str]
    data_dir: Path
    model: Path
    drifted: list[str]
    offline: list[str]

    @property
    def url(self) -> str:
        return self.admin.url

    def rollout_status(self) -> str:
        return str(self.admin.rollout(self.rollout_id)["status"])

    def gate(self, name: str) -> dict[str, Any]:
        """The rollout's current verdict of gate `name`, as the API reports it."""
        report = self.admin.rollout(self.rollout_id).get("gates") or {}
        return next((r for r in report.get("results", []) if r["name"] == name), {})

    def serve_until_judged(self, name: str) -> dict[str, Any]:
        """Let every agent serve GATE_ROWS more inferences (the updated one and the control ones) until the rollout
        judges gate `name` on them (a resumed rollout's bake starts over, so its figures with it)."""
        if self.gate(name).get("verdict") != "passed":
            _traffic(self.fleet, GATE_ROWS, self.drifted)
        wait_until(lambda: self.gate(name).get("verdict") == "passed", 30, f"gate {name} judged on the traffic")
        return self.gate(name)


def _traffic(fleet: SimulatedFleet, per_device: int, drifted: list[str]) -> None:
    """Each agent serves `per_device` held-out digits through its real model; those in `drifted` see them rotated."""
    samples = load_digits_split().x_test.astype(np.float32)[:per_device]
    rotated = parse_drift("rotate").apply(samples, np.random.default_rng(0))
    for agent in fleet.agents:
        rows = rotated if agent.config.device_id in drifted else samples
        for row in rows:
            agent.infer({"input": row[np.newaxis]})
    fleet.flush_telemetry()


def open_alerts(admin: ApiClient, rule: str = "drift") -> dict[str, dict[str, Any]]:
    """The open alerts of `rule` by cohort."""
    return {a["cohort"]: a for a in admin.alerts(state="open", rule=rule)}


@pytest.fixture(scope="module")
def scene(tmp_path_factory: pytest.TempPathFactory, digits_model_bytes: bytes) -> Iterator[Scene]:
    """Four agents on digits 1.0 with telemetry, a rollout of 2.0 whose first wave bakes for an hour (judged on
    traffic served since), and two enrolled devices that never connected."""
    root = tmp_path_factory.mktemp("dashboard")
    topic_base = f"ui{uuid.uuid4().hex[:8]}/edgefleet/v1"
    env = {"EDGEFLEET_ROLLOUT_TICK_S": "0.2", "EDGEFLEET_ALERT_TICK_S": "1", "EDGEFLEET_DRIFT_GROUP_BY": "device"}
    process = CoordinatorProcess(root / "coordinator", topic_base=topic_base, env=env)
    admin = process.start()
    fleet: SimulatedFleet | None = None
    try:
        model = root / "digits.onnx"
        model.write_bytes(digits_model_bytes)
        profile = build_profile(model, load_dataset("digits"), source="digits (held-out)")
        admin.push_model(model, name="digits", version="1.0", fields={"profile": profile.model_dump_json()})
        admin.push_model(model, name="digits", version="2.0")
        config = FleetConfig(
            devices=4,
            data_root=root / "fleet",
            coordinator_url=admin.url,
            api_token=admin.token,
            topic_base=topic_base,
            id_prefix="ui",
            tags=GROUP,
            http=False,
            telemetry_interval_s=0.5,
            sketch_rate=1.0,  # every request sketched: ROWS_PER_DEVICE rows reach drift_min_rows
        )
        fleet = SimulatedFleet(config)
        fleet.start()
        wait_until(lambda: {d["id"] for d in admin.devices()} >= set(fleet.device_ids), 30, "devices to enrol")
        admin.deploy(model="digits", version="1.0", tags=GROUP)
        assert fleet.wait_for_version("1.0", 60), "the fleet did not converge on 1.0"
        drifted = fleet.device_ids[2:]
        _traffic(fleet, ROWS_PER_DEVICE, drifted)
        wanted = {f"device={d}" for d in drifted}
        wait_until(lambda: set(open_alerts(admin)) == wanted, 30, f"drift alerts for {sorted(wanted)} (and only them)")
        plan = {
            "model": "digits",
            "version": "2.0",
            "previous_version": "1.0",
            "selector": {"tags": GROUP},
            "waves": [{"count": 1, "bake_seconds": 3600}, {"percent": 100, "bake_seconds": 0}],
            "gates": GATES,
        }
        rollout = admin.create_rollout(plan)
        wait_until(lambda: admin.rollout(rollout["id"])["status"] == "baking", 60, "the first wave to bake")
        offline = [f"ui-spare-{n}" for n in (1, 2)]
        for device_id in offline:
            enrol_device(admin, root / "spare", device_id, tags=SPARE)
        tokens = {
            role: admin.post_json("/tokens", {"name": f"ui-{role}", "role": role})["token"]
            for role in ("viewer", "operator")
        }
        yield Scene(
            admin=admin,
            fleet=fleet,
            rollout_id=int(rollout["id"]),
            tokens=tokens,
            data_dir=process.data_dir,
            model=model,
            drifted=drifted,
            offline=offline,
        )
    finally:
        if fleet is not None:
            fleet.stop()
        process.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Headless chromium (Debian's, not a downloaded one) driven by Playwright."""
    with chromium() as instance:
        yield instance


@pytest.fixture
def sign_in(browser: Any, scene: Scene) -> Iterator[Callable[[str], Visit]]:
    """Open the dashboard in a fresh browser context and sign in with a token through the login form."""
    with signing_in(browser, scene.url) as open_as:
        yield open_as


def test_viewer_sees_every_page_with_real_data_and_no_operator_buttons(
    sign_in: Callable[[str], Visit], scene: Scene
) -> None:
    visit = sign_in(scene.tokens["viewer"])
    page = visit.page
    visit.go("/fleet", ".page-fleet table[aria-label=devices]")
    assert page.inner_text("#who") == "ui-viewer (viewer)"
    for device_id in scene.fleet.device_ids + scene.offline:
        assert page.locator(f"a[href='#/devices/{device_id}']").count() == 1
    total = len(scene.fleet.device_ids) + len(scene.offline)
    assert f"{total} of {total} devices" in page.inner_text("#fleet-results")
    assert "digits:1.0" in page.inner_text("#fleet-results") and "digits:2.0" in page.inner_text("#fleet-results")
    # The device kind: no `profile` tag here, so what each agent reports (its CPU architecture and runtimes); `-` for
    # the devices that never reported anything.
    kinds = page.inner_text("section[aria-label='By device kind']")
    assert re.search(
        rf"^{re.escape(platform.machine())} · \S*onnxruntime\S*: {len(scene.fleet.device_ids)}$", kinds, re.M
    ), kinds
    assert re.search(rf"^-: {len(scene.offline)}$", kinds, re.M), kinds
    visit.shot("viewer-fleet")
    page.fill("#fleet-search", scene.drifted[-1])
    page.wait_for_selector(f"#fleet-results p:text-matches('^1 of {total} devices')", timeout=5_000)
    assert page.evaluate("location.hash") == f"#/fleet?q={scene.drifted[-1]}", "a filtered view can be shared"
    page.fill("#fleet-search", "")
    page.select_option("#fleet-tag", "ring=canary")
    page.wait_for_selector(f"#fleet-results p:text-matches('^1 of {total} devices')", timeout=5_000)
    page.select_option("#fleet-tag", "")

    # A device that sees plain digits and still runs 1.0 (the rollout's first wave moved one device to 2.0).
    device = next(
        d for d in scene.fleet.device_ids if d not in scene.drifted and scene.admin.device(d)["model_version"] == "1.0"
    )
    visit.go(f"/devices/{device}", ".page-device table[aria-label=events]")
    assert page.locator("svg.chart").count() == 3, "inferences, errors, latency"
    inferences = page.text_content("svg.chart[aria-label='Inferences per window'] text[data-series=inferences]")
    assert re.fullmatch(r"inferences: \d+", inferences or ""), inferences
    assert "● online" in page.inner_text("h1") and "✔ enrolled" in page.inner_text(".page-device")
    cohort = page.inner_text("dl[aria-label='drift of its cohort']")
    rows = re.search(r"rows\s+(\d+)\b", cohort)
    assert f"device={device}" in cohort and "✔ stable" in cohort and rows and int(rows[1]) >= ROWS_PER_DEVICE, cohort
    visit.shot("viewer-device")

    visit.go("/rollouts", ".page-rollouts table[aria-label=rollouts]")
    assert f"#{scene.rollout_id}" in page.inner_text(".page-rollouts")
    visit.shot("viewer-rollouts")

    # The updated device and the control devices served real inferences since the bake began: the gate shows the
    # observed difference of error rates next to its threshold, and its verdict.
    judged = scene.serve_until_judged("error_rate_increase")
    visit.go(f"/rollouts/{scene.rollout_id}", ".page-rollout table[aria-label=waves]")
    assert "◷ baking" in page.inner_text("h1")
    assert page.locator("button[data-command]").count() == 0, "a viewer gets no operator buttons"
    row = page.locator("table[aria-label=gates] tbody tr", has_text="error_rate_increase")
    _, verdict, observed, threshold, why = row.locator("td").all_inner_texts()
    assert (verdict, threshold) == ("✔ passed", "0.5000"), (verdict, threshold)
    assert re.fullmatch(r"-?\d+\.\d{4}", observed) and float(observed) == pytest.approx(judged["observed"], abs=1e-4)
    assert "vs control" in why, why
    visit.shot("viewer-rollout")

    visit.go("/alerts", ".page-alerts table[aria-label=alerts]")
    page.wait_for_selector("table[aria-label='drift of digits:1.0']")  # drawn when its own query answers
    alerts = page.inner_text("table[aria-label=alerts]")
    for drifted in scene.drifted:
        assert f"device={drifted}" in alerts, "the viewer sees every unresolved alert"
    assert page.locator("button[data-ack]").count() == 0, "a viewer gets no acknowledge button"
    fleet_drift = page.inner_text("table[aria-label='drift of digits:1.0']")
    assert "⚠ drifted" in fleet_drift and "insufficient" not in fleet_drift, fleet_drift
    visit.shot("viewer-alerts")
    visit.assert_clean()


def _record_federated_run(scene: Scene, candidate: str) -> int:
    """A finished federated run of digits 1.0 as the runner leaves it in the database (two rounds on two nodes, one of
    which missed the second evaluation), whose candidate is `candidate`. Real runs need Flower (tests/federated)."""
    nodes = ["101", "202"]
    rounds = []
    for n in (1, 2):
        rounds.append(
            {
                "round": n,
                "phase": "train",
                "replies": 2,
                "failures": 0,
                "nodes": nodes,
                "metrics": {"train_loss": 0.9 / n, "train_accuracy": 0.8 + 0.05 * n},
                "time": time.time(),
            }
        )
        answered = nodes if n == 1 else nodes[:1]
        rounds.append({"round": n, "phase": "evaluate", "replies": len(answered), "failures": 0, "nodes": answered,
                       "missing": nodes[len(answered):], "metrics": {"accuracy": 0.85 + 0.04 * n, "loss": 0.5 / n},
                       "time": time.time()})  # fmt: skip
    engine = create_engine(f"sqlite:///{scene.data_dir / 'edgefleet.db'}")
    try:
        with Session(engine) as session:
            run = FederatedRun(
                model_name="digits", parent_version="1.0", selector=GROUP, status="completed", node_ids=nodes,
                params={"rounds": 2, "strategy": "fedavg", "min_nodes": 2}, rounds=rounds, candidate_version=candidate,
                devices=scene.fleet.device_ids[:2], created_by="ui-operator", finished_at=datetime.now(UTC),
            )  # fmt: skip
            session.add(run)
            session.commit()
            return int(run.id or 0)
    finally:
        engine.dispose()


COMPRESSION_REPORT = {
    "evaluation": {"name": "digits (held-out)", "samples": 360},
    "max_drop_pp": 1.0,
    "baseline": {"name": "fp32", "accuracy": 0.972, "latency_p50_ms": 0.031},
    "variants": [
        {"name": "default", "accuracy": 0.972, "agreement": 1.0, "latency_p50_ms": 0.031},
        {"name": "int8-dynamic", "accuracy": 0.969, "agreement": 0.994, "latency_p50_ms": 0.024},
    ],
    "refused": [{"name": "int8-static", "reason": "accuracy drop 2.1 pp above the 1.0 pp allowed"}],
}


def edgefleet(*args: str, env: dict[str, str]) -> str:
    """Run the `edgefleet` CLI in-process; its output (fails the test on a non-zero exit)."""
    result = CliRunner().invoke(cli.build_app(load_plugins=False), list(args), env={"COLUMNS": "300", **env})
    assert result.exit_code == 0, f"edgefleet {' '.join(args)}: {result.output}"
    return result.output


def _sign_as_approver(scene: Scene, name: str, version: str, key_dir: Path) -> None:
    """`name` makes an approver key on their own machine, the offline root keys add it, and `name` signs `version`
    with `edgefleet approve` (as tests/e2e/test_governance.py does)."""
    root_keys = Path(f"{scene.data_dir}.root-keys")
    env = {"ROOT_PASS": (root_keys / "passphrase").read_text().strip(), "APPROVER_PASS": "approver secret"}
    key = key_dir / name / "approver.key"
    edgefleet("keys", "approver-keygen", "--out", str(key), "--passphrase-env", "APPROVER_PASS", env=env)
    edgefleet(
        "keys", "add-approver", name, "--public-key", str(key.with_suffix(".pub")),
        "--root-key", str(root_keys / "root-1.key"), "--root-key", str(root_keys / "root-2.key"),
        "--data-dir", str(scene.data_dir), "--passphrase-env", "ROOT_PASS", env=env,
    )  # fmt: skip
    token = scene.admin.post_json("/tokens", {"name": name, "role": "approver"})["token"]
    signed = edgefleet(
        "approve", f"digits:{version}", "--key", str(key), "--passphrase-env", "APPROVER_PASS", "--yes",
        "--url", scene.url, "--token", token, env=env,
    )  # fmt: skip
    assert "1 of 2 approvals" in signed, signed


def test_viewer_sees_models_with_lineage_federated_runs_audit_and_drift_over_time(
    sign_in: Callable[[str], Visit], scene: Scene, tmp_path: Path
) -> None:
    run_id = _record_federated_run(scene, candidate="3.0")
    fields = {"risk_class": "high", "report": json.dumps(COMPRESSION_REPORT)}
    scene.admin.push_model(scene.model, name="digits", version="3.0", fields=fields)
    card = {"intended_use": "Reading handwritten digits on forms.", "training_data": "federated retraining",
            "metrics": {"accuracy": 0.93}, "limitations": "8x8 greyscale only.", "risk_class": "high",
            "owner": "vision-team", "parent_version": "1.0", "run": f"fl-{run_id}"}  # fmt: skip
    scene.admin.put_json("/models/digits/versions/3.0/card", card)
    _sign_as_approver(scene, "alice", "3.0", tmp_path)

    visit = sign_in(scene.tokens["viewer"])
    page = visit.page
    visit.go("/models", ".page-models table[aria-label=models]")
    assert page.locator("nav a[href='#/models']").count() == 1, "Models is in the navigation"
    assert "digits" in page.inner_text("table[aria-label=models]")
    row = page.locator("table[aria-label=approvals] tbody tr", has_text="digits:3.0").inner_text()
    assert "▲ high" in row and "1 of 2" in row and "alice" in row and "nobody yet" not in row, row
    visit.shot("viewer-models")

    visit.go("/models/digits", ".page-model svg.graph")
    edges = {page.get_attribute(f"svg.graph path.edge >> nth={i}", "data-edge") for i in range(2)}
    assert edges == {f"v:1.0→r:{run_id}", f"r:{run_id}→v:3.0"}, "parent → federated run → candidate"
    assert page.locator(f"svg.graph a[href='#/federated/{run_id}'] [data-node='r:{run_id}']").count() == 1
    newest = page.inner_text("section[data-version='3.0']")
    assert "▲ high" in newest and "… awaiting approval" in newest and "1 of 2" in newest and "✔ alice" in newest
    assert "vision-team" in newest and "int8-dynamic" in newest and "accuracy drop 2.1 pp" in newest
    assert page.locator("section[data-version='1.0'] a[href='#/drift/digits/1.0']").count() == 1
    visit.shot("viewer-model")

    visit.go("/federated", ".page-federated table[aria-label='federated runs']")
    assert f"fl-{run_id}" in page.inner_text("table[aria-label='federated runs']")
    visit.go(f"/federated/{run_id}", ".page-federated table[aria-label='nodes per round']")
    assert page.locator("svg.chart").count() == 2, "train and evaluate metrics"
    accuracy = page.text_content("svg.chart[aria-label='evaluate metrics per round'] text[data-series=accuracy]")
    assert accuracy == "accuracy: 0.93"
    assert "✖ no answer" in page.inner_text("table[aria-label='nodes per round']")
    visit.shot("viewer-federated-run")

    visit.go("/audit", ".page-audit #audit-verdict")
    assert page.get_attribute("#audit-verdict", "data-ok") == "true"
    assert "✓ verified" in page.inner_text("#audit-verdict")
    assert "rollout.created" in page.inner_text("table[aria-label='audit entries']")
    assert page.locator("table[aria-label='audit entries'] tbody tr").count() > 3, "pushes, tokens, rollout, card"
    visit.shot("viewer-audit")

    visit.go("/drift/digits/1.0", ".page-drift section[data-cohort=fleet]")
    fleet = page.locator("section[data-cohort=fleet]")
    assert fleet.locator("svg.chart").count() == 3, "accuracy, feature KS, class PSI"
    assert fleet.locator("text[data-series='threshold (min effect)']").text_content() == "threshold (min effect): 0.10"
    ranges = page.locator("table[aria-label='drift over time of fleet'] tbody tr")
    assert ranges.count() == 12 and "now" in ranges.first.inner_text()
    assert "⚠ drifted" in ranges.first.inner_text(), "half the fleet sees rotated digits"
    max_ks = fleet.locator("text[data-series='max KS']").text_content()
    assert re.fullmatch(r"max KS: (0\.\d\d|1)", max_ks or ""), f"a measured value, not only the threshold: {max_ks}"
    visit.shot("viewer-drift")

    visit.go("/drift/digits/1.0?by=device", f".page-drift section[data-cohort='device={scene.drifted[0]}']")
    for device in scene.fleet.device_ids:
        now = page.locator(f"table[aria-label='drift over time of device={device}'] tbody tr").first.inner_text()
        assert ("⚠ drifted" if device in scene.drifted else "✔ stable") in now, (device, now)
    visit.shot("viewer-drift-per-device")
    visit.assert_clean()


def test_operator_pauses_and_resumes_a_real_rollout_from_the_page(
    sign_in: Callable[[str], Visit], scene: Scene
) -> None:
    visit = sign_in(scene.tokens["operator"])
    page = visit.page
    visit.go(f"/rollouts/{scene.rollout_id}", ".page-rollout button[data-command=pause]")
    assert scene.rollout_status() == "baking"

    page.click("button[data-command=pause]")
    page.wait_for_selector("dialog#confirm[open]")
    page.fill("#confirm-reason", "checking the dashboard")
    visit.shot("operator-confirm-pause")
    page.click("#confirm-ok")
    wait_until(lambda: scene.rollout_status() == "paused", 15, "the API to show the rollout paused")
    page.wait_for_selector("h1 .status[data-status=paused]", timeout=10_000)
    shown = scene.admin.rollout(scene.rollout_id)
    assert shown["reason"] and "checking the dashboard" in shown["reason"]
    visit.shot("operator-rollout-paused")

    page.click("button[data-command=resume]")
    page.wait_for_selector("dialog#confirm[open]")
    page.click("#confirm-ok")
    wait_until(lambda: scene.rollout_status() in {"running", "baking"}, 15, "the API to show the rollout resumed")
    page.wait_for_selector("button[data-command=pause]", timeout=10_000)
    visit.assert_clean()


def test_operator_acknowledges_a_real_drift_alert_from_the_alerts_page(
    sign_in: Callable[[str], Visit], scene: Scene
) -> None:
    cohort = f"device={scene.drifted[-1]}"
    alert = open_alerts(scene.admin)[cohort]
    visit = sign_in(scene.tokens["operator"])
    page = visit.page
    visit.go("/alerts", f".page-alerts button[data-ack='{alert['id']}']")
    visit.shot("operator-alerts")

    page.click(f"button[data-ack='{alert['id']}']")
    page.wait_for_selector("dialog#confirm[open]")
    assert cohort in page.inner_text("#confirm-message")
    page.fill("#confirm-reason", "camera mount turned; on it")
    page.click("#confirm-ok")
    wait_until(lambda: scene.admin.alert(alert["id"])["state"] == "acked", 15, "the API to show the alert acknowledged")
    acked = scene.admin.alert(alert["id"])
    assert (acked["acked_by"], acked["ack_note"]) == ("ui-operator", "camera mount turned; on it")
    assert acked["resolved_at"] is None, "acknowledged, still unresolved while the drift lasts"
    page.wait_for_selector("#ack-result:text-matches('acknowledged')", timeout=10_000)
    # The page redraws on its own clock too: wait for the redraw that holds the ack, then read it.
    rows = page.locator("table[aria-label=alerts] tbody tr", has_text=cohort)
    rows.filter(has_text="✓ acked").wait_for(timeout=10_000)
    row = rows.inner_text()
    assert "✓ acked" in row and "acked by ui-operator: camera mount turned; on it" in row, row
    assert page.locator(f"button[data-ack='{alert['id']}']").count() == 0, "nothing left to acknowledge"
    assert page.locator("button[data-ack]").count() == len(scene.drifted) - 1, "the other drift alert is still open"
    visit.assert_readable("/alerts after the ack")
    visit.shot("operator-alert-acked")

    # Live: the other alert acknowledged elsewhere (the CLI's client) shows without reloading the page.
    other = open_alerts(scene.admin)[f"device={scene.drifted[0]}"]
    scene.admin.ack_alert(other["id"], note="seen from the CLI")
    page.wait_for_selector("button[data-ack]", state="detached", timeout=10_000)
    row = page.locator("table[aria-label=alerts] tbody tr", has_text=f"device={scene.drifted[0]}").inner_text()
    assert "✓ acked" in row and "seen from the CLI" in row, row
    visit.assert_clean()


def test_cancelling_the_confirmation_sends_nothing(sign_in: Callable[[str], Visit], scene: Scene) -> None:
    visit = sign_in(scene.tokens["operator"])
    visit.go(f"/rollouts/{scene.rollout_id}", ".page-rollout button[data-command=abort]")
    before = len(visit.requests)
    visit.page.click("button[data-command=abort]")
    visit.page.wait_for_selector("dialog#confirm[open]")
    visit.page.click("dialog#confirm button[value=cancel]")
    visit.page.wait_for_timeout(500)
    assert not any("/abort" in u for u in visit.requests[before:])
    assert scene.rollout_status() in {"running", "baking"}


def test_operator_promotes_then_aborts_a_rollout_from_the_page(sign_in: Callable[[str], Visit], scene: Scene) -> None:
    # A rollout of its own (another model, to the two devices that never connected: its first wave waits on them), so
    # the scene's rollout stays in flight for the other tests.
    scene.admin.push_model(scene.model, name="spare-model", version="1.0")
    plan = {
        "model": "spare-model",
        "version": "1.0",
        "selector": {"tags": SPARE},
        "waves": [{"count": 1, "bake_seconds": 3600}, {"percent": 100, "bake_seconds": 3600}],
        "gates": {"max_install_failure_rate": None},
    }
    rollout_id = int(scene.admin.create_rollout(plan)["id"])
    wait_until(lambda: scene.admin.rollout(rollout_id)["status"] == "running", 30, "the spare rollout to start")
    visit = sign_in(scene.tokens["operator"])
    page = visit.page
    visit.go(f"/rollouts/{rollout_id}", ".page-rollout button[data-command=promote]")

    page.click("button[data-command=promote]")
    page.wait_for_selector("dialog#confirm[open]")
    assert "Start the next wave now" in page.inner_text("#confirm-message")
    page.click("#confirm-ok")
    wait_until(
        lambda: scene.admin.rollout(rollout_id)["current_wave_number"] == 2, 15, "the API to show the second wave"
    )
    page.wait_for_selector("#command-result:text-matches('^promote: ')", timeout=10_000)
    page.wait_for_selector("dl >> text=/^2 of 2$/", timeout=10_000)
    visit.shot("operator-rollout-promoted")

    page.click("button[data-command=abort]")
    page.wait_for_selector("dialog#confirm[open]")
    page.fill("#confirm-reason", "spare devices never came up")
    page.click("#confirm-ok")
    wait_until(lambda: scene.admin.rollout(rollout_id)["status"] == "aborted", 15, "the API to show it aborted")
    assert "spare devices never came up" in (scene.admin.rollout(rollout_id)["reason"] or "")
    page.wait_for_selector("h1 .status[data-status=aborted]", timeout=10_000)
    assert page.locator("button[data-command]").count() == 0, "nothing left to command on an aborted rollout"
    visit.assert_readable(f"/rollouts/{rollout_id} aborted")
    visit.shot("operator-rollout-aborted")
    assert scene.rollout_status() in {"running", "baking"}, "the scene's own rollout is untouched"
    visit.assert_clean()


def test_offline_only_filter_shows_exactly_the_devices_that_are_not_connected(
    sign_in: Callable[[str], Visit], scene: Scene
) -> None:
    assert {d["id"] for d in scene.admin.devices() if d["status"] != "online"} == set(scene.offline)
    visit = sign_in(scene.tokens["viewer"])
    page = visit.page
    visit.go("/fleet", ".page-fleet table[aria-label=devices]")
    page.check("#fleet-offline")
    total = len(scene.fleet.device_ids) + len(scene.offline)
    page.wait_for_selector(f"#fleet-results p:text-matches('^{len(scene.offline)} of {total} devices')")
    assert "offline=1" in page.evaluate("location.hash"), "the filtered view can be shared"
    rows = page.locator("table[aria-label=devices] tbody tr")
    shown = {rows.nth(i).locator("td").first.inner_text(): rows.nth(i).inner_text() for i in range(rows.count())}
    assert set(shown) == set(scene.offline), shown
    assert all("○ offline" in row for row in shown.values()), shown
    assert f"○ offline: {len(scene.offline)}" in page.inner_text("section[aria-label='By status']")
    visit.assert_readable("/fleet?offline=1")
    visit.shot("viewer-fleet-offline")
    visit.assert_clean()


def test_a_wrong_token_is_refused_at_the_login_form(sign_in: Callable[[str], Visit]) -> None:
    visit = sign_in("efa_not-a-token")
    visit.page.wait_for_selector("#login .error")
    assert "not a valid API token" in visit.page.inner_text("#login .error")
    assert visit.page.evaluate("sessionStorage.getItem('edgefleet.token')") is None


def test_whoami_names_the_token_and_its_role(scene: Scene) -> None:
    for role, token in scene.tokens.items():
        answer = httpx.get(f"{scene.url}/api/v1/whoami", headers={"Authorization": f"Bearer {token}"})
        assert answer.json() == {"name": f"ui-{role}", "role": role}
    refused = httpx.get(f"{scene.url}/api/v1/whoami")
    assert refused.status_code == 401 and "token" in refused.json()["detail"]


def test_dashboard_files_carry_a_same_origin_only_content_security_policy(scene: Scene) -> None:
    index = httpx.get(f"{scene.url}/ui/")
    assert index.status_code == 200 and '<script type="module" src="app.js">' in index.text
    policy = index.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe" not in policy
    script = httpx.get(f"{scene.url}/ui/pages/fleet.js")
    assert "javascript" in script.headers["content-type"] and script.headers["content-security-policy"] == policy
    assert httpx.get(f"{scene.url}/ui/meta.json").json()["latency_buckets_ms"][0] == 0.05
    assert httpx.get(f"{scene.url}/ui", follow_redirects=True).url.path == "/ui/"
    assert httpx.get(f"{scene.url}/ui/%2E%2E/__init__.py").status_code == 404, "nothing outside static/"
