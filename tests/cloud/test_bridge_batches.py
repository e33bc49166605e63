"""The bridge's batched telemetry ingest against a real Mosquitto: one bad window costs only itself."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlmodel import Session, col, select

from cloud.models import TelemetryRecord
from cloud.models.telemetry import TelemetryRollup
from protocol.codec import encode
from protocol.topics import Topics
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol, live_coordinator, wait_until, window
from tests.cloud.mqtt_helpers import connected_client, publish


def stats(api: Api) -> dict[str, Any]:
    return dict(api.client.get("/api/v1/stats").json())


def stored_seqs(api: Api, device_id: str) -> list[int]:
    with Session(api.coordinator.engine) as session:
        statement = select(TelemetryRecord.seq).where(TelemetryRecord.device_id == device_id)
        return list(session.exec(statement.order_by(col(TelemetryRecord.seq))))


def test_batch_with_a_refused_a_stranger_and_redelivered_windows_stores_the_rest_once(
    mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    topics = Topics(topic_base)
    # A long fill time: the whole burst lands in one batch.
    with live_coordinator(tmp_path, mqtt_url=mosquitto_url, topic_base=topic_base, ingest_batch_wait_ms=300) as api:
        enrol(api.coordinator, "edge-1")
        enrol(api.coordinator, "edge-2")
        burst = [
            (topics.telemetry("edge-1"), window("edge-1", 0)),
            (topics.telemetry("edge-2"), window("edge-2", 0)),
            (topics.telemetry("edge-1"), window("edge-1", 2**64)),  # valid on the wire, beyond any 64-bit column
            (topics.telemetry("ghost"), window("ghost", 0)),  # not enrolled
            (topics.telemetry("edge-1"), window("edge-1", 1)),
            (topics.telemetry("edge-1"), window("edge-1", 0)),  # a redelivery inside the batch
        ]
        with connected_client(mosquitto_url) as (client, _):
            for topic, message in burst:
                publish(client, topic, encode(message))
            wait_until(lambda: stats(api)["received"].get("telemetry") == len(burst), what="the burst received")
            wait_until(lambda: stored_seqs(api, "edge-1") == [0, 1], what="the good windows stored")
            publish(client, topics.telemetry("edge-2"), encode(window("edge-2", 0)))  # a redelivery in a later batch
            wait_until(lambda: stats(api)["duplicates_dropped"] == 2, what="both redeliveries dropped")
        counters = stats(api)
        assert counters["stored"] == {"telemetry": 3}
        assert counters["failed"] == {"telemetry": 1} and counters["rejected"] == {"telemetry": 1}
        assert "ghost" in counters["last_rejection"]
        assert stored_seqs(api, "edge-2") == [0]
        with Session(api.coordinator.engine) as session:
            rollups = {r.device_id: r for r in session.exec(select(TelemetryRollup))}
        assert (rollups["edge-1"].windows, rollups["edge-1"].inference_count) == (2, 20)
        assert (rollups["edge-2"].windows, rollups["edge-2"].inference_count) == (1, 10)
        assert api.client.get("/api/v1/devices/edge-1").json()["inference_count"] == 20
