"""The MQTT bridge against Mosquitto and the embedded amqtt broker: ingest, duplicates, malformed input, desired."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from cloud.app import create_app
from cloud.settings import Settings
from protocol.codec import encode
from protocol.messages import DeviceEvent, ReportedState, TelemetryWindow, utcnow
from protocol.telemetry import latency_histogram
from protocol.topics import Topics
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import api_for
from tests.cloud.mqtt_helpers import connected_client, publish


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)


@pytest.fixture
def live(broker_url: str, topic_base: str, tmp_path: Path) -> Iterator[Api]:
    """A coordinator bridged to `broker_url` under this test's topic base (SQLite)."""
    settings = Settings(data_dir=tmp_path / "coordinator", mqtt_url=broker_url, topic_base=topic_base, port=8080)
    app = create_app(settings)
    with TestClient(app) as client:
        api = api_for(app, client)
        assert api.coordinator.bridge is not None and api.coordinator.bridge.wait_connected(10)
        yield api


def stats(api: Api) -> dict[str, Any]:
    return dict(api.client.get("/api/v1/stats").json())


def window(device_id: str, seq: int, count: int = 10) -> TelemetryWindow:
    now = utcnow()
    return TelemetryWindow(
        device_id=device_id,
        seq=seq,
        window_start=now,
        window_end=now,
        inference_count=count,
        error_count=1,
        latency_histogram=latency_histogram([1.2] * count),
        class_counts={"3": count},
    )


def device(api: Api, device_id: str) -> dict[str, Any]:
    response = api.client.get(f"/api/v1/devices/{device_id}")
    return dict(response.json()) if response.status_code == 200 else {}


def test_ingests_reported_state_events_and_telemetry(live: Api, broker_url: str, topic_base: str) -> None:
    topics = Topics(topic_base)
    live.enrol("cam-1", {"site": "lab"})
    state = ReportedState(device_id="cam-1", tags={"site": "elsewhere"}, agent_version="0.1.0")
    event = DeviceEvent(device_id="cam-1", kind="agent.started", message="hello")
    with connected_client(broker_url) as (client, _):
        publish(client, topics.reported("cam-1"), encode(state), retain=True)
        publish(client, topics.events("cam-1"), encode(event))
        publish(client, topics.telemetry("cam-1"), encode(window("cam-1", 0)))
    shown = wait_until(lambda: device(live, "cam-1").get("telemetry_windows") == 1 and device(live, "cam-1"))
    assert shown["status"] == "online" and shown["agent_version"] == "0.1.0"
    assert shown["tags"] == {"site": "lab"}, "tags are the coordinator's (set at enrolment), not the device's"
    assert shown["inference_count"] == 10 and shown["error_count"] == 1
    wait_until(lambda: stats(live)["stored"].get("events") == 1, what="event stored")
    summary = live.client.get("/api/v1/fleet/summary").json()
    assert summary["devices"][0]["latency_p50_ms"] == 1.5  # the bucket holding 1.2 ms


def test_same_telemetry_window_twice_is_counted_once(live: Api, broker_url: str, topic_base: str) -> None:
    topic = Topics(topic_base).telemetry("cam-2")
    live.enrol("cam-2")
    with connected_client(broker_url) as (client, _):
        publish(client, topic, encode(window("cam-2", 7, count=5)))
        publish(client, topic, encode(window("cam-2", 7, count=5)))  # a QoS 1 redelivery
        publish(client, topic, encode(window("cam-2", 8, count=5)))
    wait_until(lambda: stats(live)["received"].get("telemetry") == 3, what="three windows received")
    wait_until(lambda: device(live, "cam-2").get("telemetry_windows") == 2, what="two windows stored")
    assert device(live, "cam-2")["inference_count"] == 10
    stored = live.client.get("/api/v1/devices/cam-2/telemetry").json()["data"]
    assert [w["seq"] for w in stored] == [7, 8]
    assert stats(live)["duplicates_dropped"] == 1


def test_same_event_twice_is_recorded_once(live: Api, broker_url: str, topic_base: str) -> None:
    """An MQTT tool (or the broker after the coordinator died between its commit and its PUBACK) hands an event
    again: one record; the next event, sent after it, is recorded as well."""
    topic = Topics(topic_base).events("cam-5")
    live.enrol("cam-5")
    started = DeviceEvent(device_id="cam-5", kind="agent.started", message="hello")
    moved = DeviceEvent(device_id="cam-5", kind="broker.moved", message="found it elsewhere")
    with connected_client(broker_url) as (client, _):
        publish(client, topic, encode(started))
        publish(client, topic, encode(started))  # a QoS 1 redelivery
    wait_until(lambda: stats(live)["received"].get("events") == 2, what="two events received")
    with connected_client(broker_url) as (client, _):
        publish(client, topic, encode(started))  # again, in a later batch
        publish(client, topic, encode(moved))
    wait_until(lambda: stats(live)["received"].get("events") == 4, what="four events received")
    listed = live.client.get("/api/v1/devices/cam-5/events").json()["data"]
    kinds = sorted(e["kind"] for e in listed if e["kind"] in ("agent.started", "broker.moved"))
    assert kinds == ["agent.started", "broker.moved"], listed


MALFORMED = [
    ("reported", b"not json at all"),
    ("reported", json.dumps({"schema_version": 99, "device_id": "victim"}).encode()),
    ("reported", json.dumps({"schema_version": 1}).encode()),
    ("events", json.dumps({"schema_version": 1, "device_id": "victim"}).encode()),
    ("events", b"[1, 2, 3]"),
    ("telemetry", json.dumps({"schema_version": 1, "device_id": "victim", "seq": -1}).encode()),
    ("telemetry", b"\xff\xfe\x00"),
    ("reported", encode(ReportedState(device_id="someone-else", tags={"site": "evil"}))),
]


def test_malformed_payloads_are_counted_dropped_and_change_nothing(live: Api, broker_url: str, topic_base: str) -> None:
    topics = Topics(topic_base)
    live.enrol("victim", {"site": "lab"})
    with connected_client(broker_url) as (client, _):
        publish(client, topics.reported("victim"), encode(ReportedState(device_id="victim", tags={"site": "lab"})))
        wait_until(lambda: device(live, "victim").get("status") == "online", what="victim enrolled")
        for channel, payload in MALFORMED:
            publish(client, f"{topic_base}/devices/victim/{channel}", payload)
        # A device id that cannot be one (matches the '+' filter, fails the scheme); unknown channels and
        # deeper topics never match the bridge's subscriptions, so the broker does not deliver them.
        for bad in ("devices/bad id/reported", "devices/victim/status", "devices/victim/reported/extra"):
            publish(client, f"{topic_base}/{bad}", encode(ReportedState(device_id="victim")))
        publish(client, topics.telemetry("victim"), encode(window("victim", 1)))
    wait_until(lambda: device(live, "victim").get("telemetry_windows") == 1, what="valid window after bad ones")
    counters = stats(live)
    assert counters["rejected"] == {"reported": 4, "events": 2, "telemetry": 2, "unknown": 1}
    assert counters["rejected_total"] == len(MALFORMED) + 1
    assert counters["failed"] == {}
    assert device(live, "victim")["tags"] == {"site": "lab"}, "a rejected message changed state"
    assert live.client.get("/api/v1/devices/someone-else").status_code == 404
    assert live.client.get("/healthz").status_code == 200


def test_last_will_flips_connectivity_and_keeps_the_model(live: Api, broker_url: str, topic_base: str) -> None:
    topics = Topics(topic_base)
    model = {"name": "digits", "version": "1.0", "sha256": "a" * 64}
    live.enrol("cam-3", {"k": "v"})
    online = ReportedState.model_validate({"device_id": "cam-3", "active_model": model, "tags": {"k": "v"}})
    with connected_client(broker_url) as (client, _):
        publish(client, topics.reported("cam-3"), encode(online), retain=True)
        wait_until(lambda: device(live, "cam-3").get("status") == "online", what="online")
        will = ReportedState(device_id="cam-3", status="offline")
        publish(client, topics.reported("cam-3"), encode(will), retain=True)
    shown = wait_until(lambda: device(live, "cam-3").get("status") == "offline" and device(live, "cam-3"))
    assert (shown["active_model_name"], shown["active_model_version"], shown["tags"]) == ("digits", "1.0", {"k": "v"})


def test_deployment_publishes_retained_desired_state_for_a_late_subscriber(
    live: Api, broker_url: str, topic_base: str, digits_model_bytes: bytes
) -> None:
    pushed = live.push("digits", "1.0", digits_model_bytes)
    live.report("late-1", tags={"site": "lab"})
    body = {"model": "digits", "version": "1.0", "target": {"tags": {"site": "lab"}}}
    assert live.client.post("/api/v1/deployments", json=body, headers=live.auth).status_code == 201
    time.sleep(0.3)  # the device connects only after the publish
    with connected_client(broker_url, Topics(topic_base).desired("late-1")) as (_, received):
        message = received.wait_for(lambda m: True)
    assert message.retain
    desired = json.loads(message.payload)
    assert desired["generation"] == 1
    assert desired["model"]["artifact"]["sha256"] == pushed["sha256"]
    # The device's own download link: the digest's URL with a token bound to this device.
    assert desired["model"]["artifact"]["url"].startswith(f"{pushed['artifact_url']}?device=late-1&token=")
    assert desired["model"]["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


@pytest.mark.parametrize("state", ["unknown", "pending", "revoked"])
def test_messages_of_a_device_that_is_not_enrolled_are_not_stored(
    live: Api, broker_url: str, topic_base: str, state: str
) -> None:
    topics = Topics(topic_base)
    if state == "pending":
        live.client.post("/api/v1/devices/ghost/enrolment-token", json={"tags": {"site": "lab"}})
    elif state == "revoked":
        live.enrol("ghost", {"site": "lab"})
        assert live.client.post("/api/v1/devices/ghost/revoke").status_code == 200
    with connected_client(broker_url) as (client, _):
        publish(client, topics.reported("ghost"), encode(ReportedState(device_id="ghost", tags={"site": "lab"})))
        publish(client, topics.telemetry("ghost"), encode(window("ghost", 0)))
        publish(client, topics.events("ghost"), encode(DeviceEvent(device_id="ghost", kind="agent.started")))
    wait_until(lambda: stats(live)["rejected_total"] >= 3, what="three messages of a stranger refused")
    assert stats(live)["rejected_total"] == 3
    assert stats(live)["stored"] == {}
    response = live.client.get("/api/v1/devices/ghost")
    if state == "unknown":
        assert response.status_code == 404, "telemetry auto-enrolled a device"
    else:
        assert response.json()["telemetry_windows"] == 0 and response.json()["status"] == "offline"
    summary = live.client.get("/api/v1/fleet/summary").json()
    assert summary["inference_count"] == 0, "a stranger's windows counted in the fleet summary"
