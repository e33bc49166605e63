"""Republishing never overwrites a newer retained desired state with an older one."""

from __future__ import annotations

import json
import random
import threading
import time
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import create_engine
from sqlmodel import Session

import cloud.bridge
from cloud.bridge import MqttBridge
from cloud.telemetry.counters import IngestCounters
from protocol.codec import decode
from protocol.messages import DesiredState
from protocol.topics import Topics
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol, live_coordinator, wait_until
from tests.cloud.mqtt_helpers import connected_client, host_port


class FakePaho:
    """Records what the bridge hands to paho, slowly enough to widen any race."""

    def __init__(self) -> None:
        self.published: list[tuple[str, int]] = []

    def publish(self, topic: str, payload: bytes, qos: int = 0, retain: bool = False) -> Any:
        state = decode(DesiredState, payload)
        time.sleep(0.0005)
        self.published.append((state.device_id, state.generation))
        return SimpleNamespace(rc=0)


@pytest.fixture
def bridge(tmp_path: Path) -> tuple[MqttBridge, FakePaho]:
    engine = create_engine(f"sqlite:///{tmp_path / 'x.db'}")
    made = MqttBridge(
        url="mqtt://127.0.0.1:1",
        topics=Topics("t/edgefleet/v1"),
        engine=engine,
        counters=IngestCounters(),
        client_id="x",
    )
    fake = FakePaho()
    made._client = fake  # type: ignore[assignment]  # never connected: only the publishing rule is under test
    return made, fake


def test_older_generation_is_never_published_after_a_newer_one(bridge: tuple[MqttBridge, FakePaho]) -> None:
    publisher, paho = bridge
    for generation in (6, 5, 6, 7, 2):
        publisher.publish_desired(DesiredState(device_id="edge-1", generation=generation))
    publisher.publish_desired(DesiredState(device_id="edge-2", generation=1))  # per device
    assert paho.published == [("edge-1", 6), ("edge-1", 6), ("edge-1", 7), ("edge-2", 1)]


def test_publishers_racing_on_one_device_hand_the_broker_generations_in_order(
    bridge: tuple[MqttBridge, FakePaho],
) -> None:
    publisher, paho = bridge
    generations = list(range(200))
    random.Random(7).shuffle(generations)
    chunks = [generations[i::8] for i in range(8)]

    def publish_all(chunk: list[int]) -> None:
        for generation in chunk:
            publisher.publish_desired(DesiredState(device_id="edge-1", generation=generation))

    threads = [threading.Thread(target=publish_all, args=(chunk,)) for chunk in chunks]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    handed = [generation for _, generation in paho.published]
    assert handed == sorted(handed) and handed[-1] == 199


def retained_generation(url: str, topic: str) -> int:
    with connected_client(url, topic) as (_, received):
        message = received.wait_for(lambda m: True)
    assert message.retain
    return int(json.loads(message.payload)["generation"])


def test_republish_racing_a_deployment_leaves_the_newest_desired_state_retained(
    mosquitto_url: str, topic_base: str, tmp_path: Path, digits_model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    client_id = f"coordinator-{uuid.uuid4().hex[:8]}"
    with live_coordinator(tmp_path, mqtt_url=mosquitto_url, topic_base=topic_base, mqtt_client_id=client_id) as api:
        api.push("digits", "1.0", digits_model_bytes)
        enrol(api.coordinator, "edge-1")
        deploy(api)  # generation 1

        raced = threading.Event()
        read_stored = cloud.bridge.desired_states

        def read_then_lose_the_race(*, session: Session) -> list[DesiredState]:
            stored = read_stored(session=session)  # generation 1 ...
            if not raced.is_set():
                deploy(api)  # ... while the API commits and publishes generation 2 before the republish publishes
                raced.set()
            return stored

        monkeypatch.setattr(cloud.bridge, "desired_states", read_then_lose_the_race)
        take_over_session(mosquitto_url, client_id)  # the bridge is disconnected, reconnects and republishes
        wait_until(raced.is_set, timeout=40, what="the republish after the reconnect")
        time.sleep(0.5)  # whatever the republish hands to paho reaches the broker
        assert retained_generation(mosquitto_url, Topics(topic_base).desired("edge-1")) == 2


def deploy(api: Api) -> None:
    body = {"model": "digits", "version": "1.0", "target": {"device_ids": ["edge-1"]}}
    response = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
    assert response.status_code == 201, response.text


def take_over_session(url: str, client_id: str) -> None:
    """Connect with `client_id` (keeping its persistent session): the broker drops the client that held it."""
    intruder = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
    host, port = host_port(url)
    intruder.connect(host, port, keepalive=30)
    intruder.loop_start()
    time.sleep(0.3)
    intruder.disconnect()
    intruder.loop_stop()
