"""The coordinator acknowledges stored telemetry per device, retained, cheaply: what it says and how often."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

import pytest
from sqlmodel import Session

import cloud.telemetry.acks as acks
from cloud.db import create_db_engine, init_db
from cloud.models import Device, TelemetryRecord
from cloud.telemetry.acks import AckThrottle, acknowledge_telemetry, recently_heard, telemetry_ack
from cloud.telemetry.ingest import Arrival, store_windows
from protocol.codec import decode, encode
from protocol.messages import ReportedState, TelemetryAck, utcnow
from protocol.topics import Topics
from tests.cloud.fleet_helpers import enrol, live_coordinator, window
from tests.cloud.mqtt_helpers import connected_client, publish

# -- when to acknowledge (pure) ----------------------------------------------------------------------


def test_burst_is_acknowledged_at_once_then_once_more_when_it_ends() -> None:
    throttle = AckThrottle(interval_s=1.0)
    assert throttle.stored("edge-1", now=10.0)  # the first window of a burst: at once
    assert not any(throttle.stored("edge-1", now=10.0 + i / 10) for i in range(1, 9))
    assert throttle.stored("edge-2", now=10.5)  # per device
    assert throttle.next_due() == 11.0 and throttle.due(now=10.99) == []
    assert throttle.due(now=11.0) == ["edge-1"]  # the end of the burst: once
    assert throttle.due(now=20.0) == [] and throttle.next_due() is None


def test_steady_stream_is_acknowledged_at_most_once_per_interval() -> None:
    throttle = AckThrottle(interval_s=1.0)
    sent = 0
    for tick in range(100):  # ten windows a second for ten seconds
        now = tick / 10
        sent += throttle.stored("edge-1", now=now)
        sent += len(throttle.due(now=now))
    assert 9 <= sent <= 11


def test_recheck_comes_back_to_a_device_no_sooner_than_the_throttle_allows() -> None:
    throttle = AckThrottle(interval_s=1.0)
    assert throttle.stored("edge-1", now=10.0)
    throttle.recheck("edge-1", at=10.2)  # a hole's grace period ends before the interval does
    assert throttle.next_due() == 11.0 and throttle.due(now=11.0) == ["edge-1"]
    throttle.recheck("edge-2", at=15.0)  # a device not acknowledged lately: exactly then
    assert throttle.due(now=14.9) == [] and throttle.due(now=15.0) == ["edge-2"]


# -- what to acknowledge (the database) --------------------------------------------------------------


@contextmanager
def stored(database_url: str, seqs: list[int]) -> Iterator[Session]:
    """A session on a database holding the telemetry windows `seqs` of device `edge-1` (`add_windows`)."""
    engine = create_db_engine(database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            session.add(Device(id="edge-1"))
            add_windows(session, seqs)
            yield session
    finally:
        engine.dispose()


def add_windows(session: Session, seqs: list[int], *, starts: tuple[int, ...] = (0,)) -> None:
    """Windows of `edge-1` linked to the seq below them, except `starts` (no `prev_seq`: a new chain)."""
    for seq in seqs:
        prev = None if seq in starts else seq - 1
        session.add(TelemetryRecord(device_id="edge-1", seq=seq, prev_seq=prev, inference_count=1, error_count=0))
    session.commit()


def test_ack_says_the_highest_and_where_the_chain_of_windows_is_settled(database_url: str) -> None:
    with stored(database_url, []) as session:
        add_windows(session, [3, 4, 5, 6, 8, 9], starts=(3,))
        nothing = telemetry_ack(session, "nobody")
        assert (nothing.stored_seq, nothing.max_seq) == (None, None)
        first = telemetry_ack(session, "edge-1")
        assert (first.stored_seq, first.max_seq) == (6, 9)  # 8 links back to 7, which is not stored (yet)
        assert [first.confirms(seq) for seq in (3, 6, 7, 8)] == [True, True, False, False]
        add_windows(session, [7])
        again = telemetry_ack(session, "edge-1")
        assert (again.stored_seq, again.max_seq, again.missing) == (9, 9, [])


def test_declared_jump_and_windows_of_older_agents_settle_without_a_gap(database_url: str) -> None:
    with stored(database_url, [0, 1, 2]) as session:
        add_windows(session, [1003, 1004], starts=(1003,))  # a lost counter: a new chain 1000 above the last
        for seq in (2000, 2005):  # an older agent says nothing of its chain: each window stands alone
            session.add(TelemetryRecord(device_id="edge-1", seq=seq, inference_count=1, error_count=0))
        session.commit()
        ack = telemetry_ack(session, "edge-1")
        assert (ack.stored_seq, ack.max_seq, ack.missing) == (2005, 2005, [])


def test_one_ack_settles_at_most_a_bounded_scan_ahead(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(acks, "ACK_SCAN_ROWS", 4)
    with stored(database_url, list(range(10))) as session:
        settled = [telemetry_ack(session, "edge-1").stored_seq for _ in range(3)]
        assert settled == [3, 7, 9]
        answer = acknowledge_telemetry(session, "edge-1")
        assert answer.recheck_s is None  # everything settled: nothing to come back to


# -- on the wire ---------------------------------------------------------------------------------


def test_burst_of_windows_ends_in_one_retained_ack_of_all_of_them(
    mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    topics = Topics(topic_base)
    with live_coordinator(tmp_path, mqtt_url=mosquitto_url, topic_base=topic_base) as api:
        enrol(api.coordinator, "edge-1")
        with connected_client(mosquitto_url, topics.ack("edge-1")) as (client, received):
            publish(client, topics.reported("edge-1"), encode(ReportedState(device_id="edge-1")))
            answer = decode(TelemetryAck, received.wait_for(lambda m: True).payload)
            assert (answer.stored_seq, answer.max_seq) == (None, None)  # the answer to a report: nothing stored
            for seq in range(50):
                publish(client, topics.telemetry("edge-1"), encode(window("edge-1", seq)))
            last = received.wait_for(lambda m: json.loads(m.payload)["max_seq"] == 49)
            assert json.loads(last.payload)["stored_seq"] == 49
        counters = api.client.get("/api/v1/stats", headers=api.auth).json()
        assert 2 <= counters["acks_published"] <= 10, counters  # throttled: not one per window
    with connected_client(mosquitto_url, topics.ack("edge-1")) as (_, received):
        retained = received.wait_for(lambda m: True)
    assert retained.retain and json.loads(retained.payload)["max_seq"] == 49


def test_a_starting_coordinator_acknowledges_what_a_process_that_died_stored_but_never_acknowledged(
    mosquitto_url: str, topic_base: str, tmp_path: Path
) -> None:
    """A process killed between storing windows and its throttled acknowledgement leaves the device unconfirmed (its
    agent would resend 30 s later): the next process to start acknowledges every device heard in the last minutes."""
    topics = Topics(topic_base)
    database_url = f"sqlite:///{tmp_path / 'shared.db'}"
    with live_coordinator(
        tmp_path / "first", mqtt_url=mosquitto_url, topic_base=topic_base, database_url=database_url
    ) as api:
        enrol(api.coordinator, "edge-1")
        enrol(api.coordinator, "edge-quiet")
        with Session(api.coordinator.engine) as session:  # stored as a bridge stores them, then no acknowledgement
            store_windows(session, [Arrival(window("edge-1", seq)) for seq in range(3)])
            device = session.get(Device, "edge-quiet")
            assert device is not None
            device.last_seen = utcnow() - timedelta(hours=1)  # heard from long ago: nothing of it waits
            session.add(device)
            session.commit()
            assert recently_heard(session, 120.0) == ["edge-1"]
    with (
        connected_client(mosquitto_url, topics.ack("edge-1")) as (_, received),
        live_coordinator(tmp_path / "second", mqtt_url=mosquitto_url, topic_base=topic_base, database_url=database_url),
    ):
        answer = decode(TelemetryAck, received.wait_for(lambda m: True, timeout=15).payload)
    assert (answer.stored_seq, answer.max_seq) == (2, 2)
