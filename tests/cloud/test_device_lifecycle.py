"""A device's everyday commands: `devices show`, its event history (paged, and followed until Ctrl-C from a real
`edgefleet` process), and decommissioning it on a live broker: revoked, its retained desired state cleared, out of
the fleet summary, deployments and rollouts, its history kept."""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from sqlmodel import Session

from cloud.services.devices import ingest_event
from cloud.telemetry.windows import ingest_telemetry
from protocol.codec import encode
from protocol.messages import DeviceEvent, ReportedState
from protocol.topics import Topics
from simulators import CoordinatorProcess
from tests.cloud.cards_helpers import INPUTS
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol, live_coordinator, window
from tests.cloud.mqtt_helpers import connected_client, publish

EDGEFLEET = Path(sys.executable).parent / "edgefleet"


def wait_until(check: Callable[[], Any], timeout: float = 15.0) -> Any:
    """What `check` returns once it is truthy; fails after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"not reached within {timeout}s"
        time.sleep(0.1)
    return result


def event(api: Api, device_id: str, kind: str, message: str = "", **fields: Any) -> None:
    """Store a device event as the bridge does when the device publishes one."""
    with Session(api.coordinator.engine) as session:
        ingest_event(session=session, event=DeviceEvent(device_id=device_id, kind=kind, message=message, **fields))


def test_devices_show_tells_model_variant_certificate_telemetry_and_recent_events(
    api: Api, monkeypatch: pytest.MonkeyPatch
) -> None:
    edgefleet = in_process_cli(api, monkeypatch)
    enrol(api.coordinator, "gateway-with-a-rather-long-identifier-07", tags={"site": "lab"})
    device_id = "gateway-with-a-rather-long-identifier-07"
    api.push("digits", "1.0", b"fp32 bytes", inputs=INPUTS)
    variant = api.client.post(
        "/api/v1/models/digits/versions/1.0/variants",
        data={"variant": "int8", "inputs": INPUTS, "precision": "int8"},
        files={"file": ("v.onnx", b"int8 bytes", "application/octet-stream")},
    ).json()["variants"][0]
    model = {"name": "digits", "version": "1.0", "sha256": variant["sha256"]}
    api.report(device_id, active_model=model, agent_version="0.1.0", update={"generation": 1, "phase": "active"})
    with Session(api.coordinator.engine) as session:
        for seq in (0, 1):
            ingest_telemetry(session=session, window=window(device_id, seq, count=7))
    event(api, device_id, "update.activated", "digits:1.0 active", generation=1)

    shown = api.client.get(f"/api/v1/devices/{device_id}").json()
    assert (shown["active_variant"], shown["inference_count"], shown["telemetry_windows"]) == ("int8", 14, 2)
    certificate = shown["certificate"]
    assert certificate["revoked_at"] is None and certificate["not_after"] > certificate["issued_at"]

    body = ok_json(edgefleet("devices", "show", device_id, "--json"))
    assert body["certificate"]["serial"] == certificate["serial"]
    assert [e["kind"] for e in body["events"]][-1] == "update.activated"
    table = edgefleet("devices", "show", device_id)
    assert table.exit_code == 0, table.output
    for text in (device_id, "variant: int8", f"serial {certificate['serial']}", "agent: 0.1.0", "14 inferences"):
        assert text in table.stdout, text
    assert "update.activated" in table.stdout and "device.enrolled" in table.stdout
    narrow = edgefleet("devices", "list", columns=60)
    assert narrow.exit_code == 0 and device_id in narrow.stdout, "a narrow terminal never cuts a device id"
    missing = edgefleet("devices", "show", "ghost")
    assert missing.exit_code == 1 and "device 'ghost' is not known" in missing.output


def test_device_events_are_paged_newest_last(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    edgefleet = in_process_cli(api, monkeypatch)
    api.enrol("cam-1")
    for n in range(5):
        event(api, "cam-1", "update.progress", f"step {n}", generation=1, phase="downloading")
    newest = api.client.get("/api/v1/devices/cam-1/events", params={"limit": 2}).json()["data"]
    assert [e["message"] for e in newest] == ["step 3", "step 4"]
    first = api.client.get("/api/v1/devices/cam-1/events", params={"limit": 100}).json()["data"][0]["id"]
    page = api.client.get("/api/v1/devices/cam-1/events", params={"after_id": first, "limit": 2}).json()
    assert [e["message"] for e in page["data"]] == ["step 1", "step 2"] and page["count"] == 2

    listed = ok_json(edgefleet("devices", "events", "cam-1", "--limit", "3", "--json"))
    assert listed["count"] == 3 and [e["message"] for e in listed["data"]] == ["step 2", "step 3", "step 4"]
    assert "step 4" in edgefleet("devices", "events", "cam-1").stdout
    unknown = edgefleet("devices", "events", "ghost")
    assert unknown.exit_code == 1 and "(HTTP 404)" in unknown.output


@pytest.fixture(scope="module")
def coordinator_process(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CoordinatorProcess]:
    """`edgefleet up` in its own process (embedded broker, SQLite)."""
    process = CoordinatorProcess(tmp_path_factory.mktemp("up") / "coordinator")
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """The lines `proc` prints, as they come."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.put(line)

    threading.Thread(target=read, daemon=True).start()
    return lines


def test_events_follow_prints_a_new_event_then_ctrl_c_ends_it_with_exit_0(
    coordinator_process: CoordinatorProcess,
) -> None:
    client = coordinator_process.client()
    client.post_json("/devices/cam-follow/enrolment-token", {"tags": {"site": "lab"}})
    env = dict(os.environ, EDGEFLEET_TOKEN=client.token or "", EDGEFLEET_CONFIG="/nonexistent/edgefleet.toml")
    command = [str(EDGEFLEET), "devices", "events", "cam-follow", "--follow", "--json", "--interval", "0.1"]
    proc = subprocess.Popen(
        [*command, "--url", client.url], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        lines = lines_of(proc)
        assert json.loads(lines.get(timeout=20))["kind"] == "device.enrolment_token"
        client.post_json("/devices/cam-follow/revoke", {})
        followed = json.loads(lines.get(timeout=10))
        assert (followed["kind"], followed["message"]) == ("device.revoked", "revoked by admin")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


@pytest.fixture
def live(broker_url: str, topic_base: str, tmp_path: Path) -> Iterator[Api]:
    """A coordinator bridged to a real broker (Mosquitto, then amqtt) under this test's topic base (SQLite)."""
    with live_coordinator(tmp_path, mqtt_url=broker_url, topic_base=topic_base) as api:
        yield api


def test_decommission_revokes_clears_retained_state_and_leaves_the_fleet_keeping_history(
    live: Api, broker_url: str, topic_base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    edgefleet = in_process_cli(live, monkeypatch)
    topics = Topics(topic_base)
    for device_id in ("cam-1", "cam-2"):
        enrol(live.coordinator, device_id, tags={"site": "lab"})
    live.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    with connected_client(broker_url) as (client, _):
        for device_id in ("cam-1", "cam-2"):
            publish(client, topics.reported(device_id), encode(ReportedState(device_id=device_id)), retain=True)
    first = ok_json(edgefleet("deploy", "digits:1.0", "--to", "site=lab", "--json"))
    assert sorted(t["device_id"] for t in first["targets"]) == ["cam-1", "cam-2"]
    serial = live.client.get("/api/v1/devices/cam-1").json()["certificate"]["serial"]

    with connected_client(broker_url, topics.desired("cam-1")) as (_, desired):
        desired.wait_for(lambda m: bool(m.payload))  # retained, or live if it was published just now
        assert edgefleet("devices", "decommission", "cam-1", input="n\n").exit_code == 1, "not confirmed"
        done = ok_json(edgefleet("devices", "decommission", "cam-1", "--yes", "--json"))
        desired.wait_for(lambda m: m.payload == b"")  # the retained desired state is cleared
    assert done["enrolment"] == "decommissioned" and done["decommissioned_at"] is not None
    assert done["certificate"]["revoked_at"] is not None
    crl = x509.load_pem_x509_crl(live.anonymous.get("/api/v1/pki/crl.pem").content)
    assert crl.get_revoked_certificate_by_serial_number(int(serial, 16)) is not None
    with connected_client(broker_url, topics.desired("cam-1"), topics.desired("cam-2")) as (_, fresh):
        fresh.wait_for(lambda m: m.topic == topics.desired("cam-2"))
        assert not [m for m in fresh.messages if m.topic == topics.desired("cam-1") and m.payload]

    summary = ok_json(edgefleet("fleet", "summary", "--json"))
    assert summary["device_count"] == 1 and [d["device_id"] for d in summary["devices"]] == ["cam-2"]
    settled = live.client.get(f"/api/v1/deployments/{first['id']}").json()
    assert {t["device_id"]: t["status"] for t in settled["targets"]}["cam-1"] == "superseded"
    second = ok_json(edgefleet("deploy", "digits:1.0", "--to", "site=lab", "--json"))
    assert [t["device_id"] for t in second["targets"]] == ["cam-2"]
    refused = edgefleet("deploy", "digits:1.0", "--to", "cam-1")
    assert refused.exit_code == 1 and "decommissioned devices cannot be deployed to: cam-1" in refused.output
    rollout = live.client.post("/api/v1/rollouts", json={"model": "digits", "version": "1.0", "selector": {}})
    assert rollout.status_code == 201, rollout.text
    started = wait_until(lambda: live.client.get(f"/api/v1/rollouts/{rollout.json()['id']}").json()["devices"])
    assert [d["device_id"] for d in started] == ["cam-2"], "the whole fleet, without the decommissioned device"
    # Its history stays: listed with its state, events and deployments kept; a repeated decommission changes nothing.
    listed = {d["id"]: d for d in ok_json(edgefleet("devices", "list", "--json"))["data"]}
    assert listed["cam-1"]["enrolment"] == "decommissioned"
    kinds = [e["kind"] for e in live.client.get("/api/v1/devices/cam-1/events").json()["data"]]
    assert kinds[-2:] == ["device.revoked", "device.decommissioned"] and "device.enrolled" in kinds
    again = ok_json(edgefleet("devices", "decommission", "cam-1", "--yes", "--json"))
    assert again["decommissioned_at"] == done["decommissioned_at"]
    assert live.client.get("/api/v1/audit", params={"action": "device.decommissioned"}).json()["count"] == 1
