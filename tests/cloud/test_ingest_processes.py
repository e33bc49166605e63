"""Telemetry ingest over two processes (an MQTT shared subscription) against a real Mosquitto and a real database."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from pydantic import ValidationError
from sqlmodel import Session, func, select

from cloud.models import TelemetryRecord
from cloud.settings import Settings
from cloud.telemetry.processes import IngestProcesses
from protocol.codec import decode, encode
from protocol.messages import TelemetryAck
from protocol.topics import Topics
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol, live_coordinator, wait_until, window
from tests.cloud.mqtt_helpers import Received, connected_client, publish

DEVICES = [f"edge-{i}" for i in range(4)]


def stored_pairs(api: Api) -> list[tuple[str, int]]:
    with Session(api.coordinator.engine) as session:
        return sorted(session.exec(select(TelemetryRecord.device_id, TelemetryRecord.seq)).all())


def row_count(api: Api) -> int:
    with Session(api.coordinator.engine) as session:
        return int(session.exec(select(func.count()).select_from(TelemetryRecord)).one())


def last_acks(received: Received) -> dict[str, TelemetryAck]:
    """The newest acknowledgement each device received (by arrival order)."""
    acks: dict[str, TelemetryAck] = {}
    for message in list(received.messages):
        if message.payload:
            ack = decode(TelemetryAck, message.payload)
            acks[ack.device_id] = ack
    return acks


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_two_ingest_processes_store_every_window_once_through_a_member_killed_mid_stream(
    mosquitto_url: str, topic_base: str, tmp_path: Path, database_url: str
) -> None:
    topics = Topics(topic_base)
    with live_coordinator(
        tmp_path, mqtt_url=mosquitto_url, topic_base=topic_base, database_url=database_url, ingest_processes=2
    ) as api:
        ingest = api.coordinator.ingest
        assert isinstance(ingest, IngestProcesses)
        for device_id in DEVICES:
            enrol(api.coordinator, device_id)
        # The member's bridge has connected (its connect is counted with the coordinator's own).
        wait_until(
            lambda: api.client.get("/api/v1/stats").json()["connects"] >= 2,
            90,  # a bound on liveness: a new Python process importing the coordinator took > 30 s on a loaded runner
            "the ingest process connected",
        )
        [member_pid] = ingest.pids
        assert member_pid is not None
        with connected_client(mosquitto_url, f"{topic_base}/devices/+/ack") as (client, acks):
            for seq in range(50):
                for device_id in DEVICES:
                    publish(client, topics.telemetry(device_id), encode(window(device_id, seq)))
            wait_until(lambda: row_count(api) == 200, 30, "the first 200 windows stored")
            # Both processes took a share (the member reports its counts every half second).
            assert wait_until(lambda: ingest.stored[0], 5, "the member's share reported") < 200
            wait_until(
                lambda: {a.stored_seq for a in last_acks(acks).values()} == {49} and len(last_acks(acks)) == 4,
                15,
                "every device's last acknowledgement confirming seq 49",
            )

            def second_half() -> None:
                for seq in range(50, 100):
                    for device_id in DEVICES:
                        publish(client, topics.telemetry(device_id), encode(window(device_id, seq)))

            sender = threading.Thread(target=second_half)
            sender.start()
            wait_until(lambda: row_count(api) >= 240, 30, "the second half under way")
            os.kill(member_pid, signal.SIGKILL)  # mid-stream: windows in its batch and queue were not acknowledged
            sender.join(60)
            wait_until(lambda: ingest.starts == [2] and ingest.pids[0] is not None, 60, "the member restarted")
            wait_until(lambda: row_count(api) == 400, 90, "every window stored after the restart")
            assert stored_pairs(api) == sorted((d, seq) for d in DEVICES for seq in range(100))  # once each
            wait_until(
                lambda: {a.stored_seq for a in last_acks(acks).values()} == {99},
                45,  # a bound on liveness, not a speed: a loaded 2-core runner took more than 15 s once
                "every device's last acknowledgement confirming seq 99",
            )
        stats = api.client.get("/api/v1/stats").json()
        assert stats["stored"]["telemetry"] + stats["duplicates_dropped"] >= 400 - ingest.stored[0]
        assert stats["failed"] == {}
        restarted_pid = ingest.pids[0]
        assert restarted_pid is not None and restarted_pid != member_pid
    assert not alive(restarted_pid), "the ingest process stopped with the coordinator"


def test_ingest_process_stops_when_its_coordinator_goes_away(tmp_path: Path) -> None:
    """Its stdin is a pipe from the coordinator: the pipe's end (a stop, or the coordinator dying) stops it."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "cloud.telemetry.worker"], stdin=subprocess.PIPE, stderr=subprocess.PIPE
    )
    assert proc.stdin is not None
    config = {
        "index": 1,
        "url": "mqtt://127.0.0.1:9",  # nothing listens: paho keeps retrying in the background
        "topic_base": "t/edgefleet/v1",
        "database_url": f"sqlite:///{tmp_path / 'edgefleet.db'}",
        "client_id": "test-ingest-1",
        "share_group": "test",
        "gap_grace_s": 120,
        "batch_max": 500,
        "batch_wait_s": 0.005,
        "bucket_s": 60,
    }
    proc.stdin.write(json.dumps(config).encode() + b"\n")
    proc.stdin.flush()
    assert proc.stderr is not None
    lines: list[bytes] = []
    started = threading.Event()

    def read_stderr() -> None:  # the bridge may log its failed connects before (or after) the started line
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.append(line)
            if b"ingest process started" in line:
                started.set()

    threading.Thread(target=read_stderr, daemon=True).start()
    assert started.wait(30), b"".join(lines).decode(errors="replace")
    proc.stdin.close()  # what the kernel does when the coordinator dies
    assert proc.wait(20) == 0


def test_several_ingest_processes_are_refused_with_the_embedded_broker(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="needs an external broker with shared subscriptions"):
        Settings(data_dir=tmp_path, ingest_processes=2)
    assert Settings(data_dir=tmp_path, ingest_processes=2, mqtt_url="mqtt://127.0.0.1:1883").ingest_processes == 2
