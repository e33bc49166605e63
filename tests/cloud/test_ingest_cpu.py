"""What the bridge does to spend less CPU a window keeps its promises: a batch's PUBACKs in one write
(`cloud.bridge._puback_all`) acknowledge every window; the collector's pacing (`cloud.telemetry.collector`)."""

from __future__ import annotations

import gc
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

import paho.mqtt.client as mqtt
from sqlalchemy.engine import Engine

from cloud.bridge import MqttBridge, _puback_all
from cloud.db import create_db_engine, init_db
from cloud.telemetry.collector import FULL_COLLECTION_EVERY, pace_full_collections
from cloud.telemetry.counters import IngestCounters
from protocol.codec import encode
from protocol.topics import Topics
from tests.cloud.conftest import enrol_for_test
from tests.cloud.fleet_helpers import wait_until, window
from tests.cloud.mqtt_helpers import connected_client, publish


@contextmanager
def collector_thresholds(*thresholds: int, enabled: bool = True) -> Iterator[None]:
    """The collector set to `thresholds` (and enabled or not) for a test, restored afterwards."""
    saved, was_enabled = gc.get_threshold(), gc.isenabled()
    gc.set_threshold(*thresholds)
    if not enabled:
        gc.disable()
    try:
        yield
    finally:
        gc.set_threshold(*saved)
        if was_enabled:
            gc.enable()


@contextmanager
def running_bridge(url: str, topics: Topics, engine: Engine, client_id: str) -> Iterator[IngestCounters]:
    """The coordinator's bridge on its persistent session `client_id`, batching for 300 ms; its counters."""
    counters = IngestCounters()
    bridge = MqttBridge(url=url, topics=topics, engine=engine, counters=counters, client_id=client_id, batch_wait_s=0.3)
    bridge.start()
    try:
        assert bridge.wait_connected(10), "the bridge did not connect"
        wait_until(lambda: counters.snapshot()["connects"] >= 1, what="the bridge's subscriptions")
        yield counters
    finally:
        bridge.stop()


def test_windows_acknowledged_in_one_write_never_come_again_on_the_persistent_session(
    mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    topics = Topics(topic_base)
    engine = create_db_engine(f"sqlite:///{tmp_path / 'coordinator.db'}")
    init_db(engine)
    devices = [f"edge-{i}" for i in range(3)]
    for device_id in devices:
        enrol_for_test(engine, device_id, None)
    client_id = f"coordinator-{uuid.uuid4().hex[:8]}"
    burst = [(device_id, seq) for seq in range(40) for device_id in devices]  # 120 windows: one or two batches
    with connected_client(mosquitto_url) as (client, _):
        with running_bridge(mosquitto_url, topics, engine, client_id) as counters:
            for device_id, seq in burst:
                publish(client, topics.telemetry(device_id), encode(window(device_id, seq)))
            wait_until(lambda: counters.snapshot()["stored"].get("telemetry") == len(burst), what="the burst stored")
        # While the bridge is away, one more window waits in its session: the broker would hand back with it any
        # window of the burst whose PUBACK it never got.
        publish(client, topics.telemetry("edge-0"), encode(window("edge-0", 40)))
        with running_bridge(mosquitto_url, topics, engine, client_id) as counters:
            wait_until(lambda: counters.snapshot()["stored"].get("telemetry") == 1, what="the waiting window stored")
            snapshot = counters.snapshot()
    assert snapshot["received"] == {"telemetry": 1}
    assert snapshot["duplicates_dropped"] == 0
    engine.dispose()


def test_full_collections_are_paced_once_a_telemetry_bridge_starts(
    mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'coordinator.db'}")
    init_db(engine)
    client_id = f"coordinator-{uuid.uuid4().hex[:8]}"
    with collector_thresholds(700, 10, 10), running_bridge(mosquitto_url, Topics(topic_base), engine, client_id):
        assert gc.get_threshold() == (700, 10, FULL_COLLECTION_EVERY)
    engine.dispose()


def test_pacing_leaves_a_higher_threshold_or_a_disabled_collector_as_the_operator_set_them() -> None:
    with collector_thresholds(500, 20, 1000):
        pace_full_collections()
        assert gc.get_threshold() == (500, 20, 1000)
    with collector_thresholds(700, 10, 10, enabled=False):
        pace_full_collections()
        assert gc.get_threshold() == (700, 10, 10) and not gc.isenabled()


class _ClientWithoutPacketQueue:
    """A paho client of another major version: only the public `ack`."""

    def __init__(self) -> None:
        self.acked: list[tuple[int, int]] = []

    def ack(self, mid: int, qos: int) -> None:
        self.acked.append((mid, qos))


def test_pubacks_go_one_by_one_when_paho_has_no_packet_queue() -> None:
    client = _ClientWithoutPacketQueue()
    _puback_all(cast(mqtt.Client, client), [7, 8, 9])
    assert client.acked == [(7, 1), (8, 1), (9, 1)]
