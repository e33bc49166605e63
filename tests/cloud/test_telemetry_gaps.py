"""A device's chain of telemetry windows: settled as windows arrive, holes reported after a grace period, late
windows shrinking a reported gap, and the acknowledgement rule an agent's outbox relies on."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta

import pytest
from pydantic import ValidationError
from sqlmodel import Session, col, select

from cloud.db import create_db_engine, init_db
from cloud.models import Device, DeviceEventRecord, TelemetryGap
from cloud.services.devices import get_device
from cloud.telemetry.acks import acknowledge_telemetry
from cloud.telemetry.chain import Hole, split_range, walk_chain
from cloud.telemetry.gaps import TELEMETRY_DROPPED, TELEMETRY_GAP, TELEMETRY_GAP_FILLED
from cloud.telemetry.windows import ingest_telemetry
from protocol import TelemetryAck, TelemetryWindow, utcnow
from protocol.messages import SeqRange
from tests.cloud.fleet_helpers import window

# -- the chain (pure) --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settled", "links", "settles_at", "hole"),
    [
        (None, [], None, None),
        (None, [(0, None), (1, 0), (2, 1)], 2, None),  # a new device's first chain
        (2, [(3, 2), (5, 4)], 3, Hole(first=4, last=4, before=5)),  # 4 never arrived
        (2, [(6, 5)], 2, Hole(first=3, last=5, before=6)),  # 3..5 never arrived
        (None, [(3, 2)], None, Hole(first=0, last=2, before=3)),  # even the first windows of a device
        (41, [(1042, None), (1043, 1042)], 1043, None),  # a lost counter's new chain: a declared jump
        (41, [(1042, 50)], 41, Hole(first=42, last=50, before=1042)),  # ...that says what it had before
        (41, [(1042, 4)], 1042, None),  # a counter restored from an old copy links below: nothing missing
        (7, [(8, None), (9, None)], 9, None),  # an older agent sends no prev_seq: its windows stand alone
    ],
)
def test_chain_settles_linked_windows_and_stops_at_the_first_hole(
    settled: int | None, links: list[tuple[int, int | None]], settles_at: int | None, hole: Hole | None
) -> None:
    walk = walk_chain(settled, links)
    assert (walk.settled, walk.hole) == (settles_at, hole)


@pytest.mark.parametrize(
    ("arrived", "left"),
    [([], [(3, 9)]), ([3], [(4, 9)]), ([9], [(3, 8)]), ([5, 6], [(3, 4), (7, 9)]), (list(range(3, 10)), [])],
)
def test_late_windows_leave_what_is_still_missing_of_a_gap(arrived: list[int], left: list[tuple[int, int]]) -> None:
    assert split_range(3, 9, arrived) == left


# -- the acknowledgement an outbox can use (protocol) ------------------------------------------------------


def test_ack_confirms_settled_windows_except_the_reported_missing_ones() -> None:
    ack = TelemetryAck(device_id="d", stored_seq=20, max_seq=25, missing=[SeqRange(first=5, last=7)])
    assert [seq for seq in range(30) if ack.confirms(seq)] == [*range(5), *range(8, 21)]
    assert not TelemetryAck(device_id="d").confirms(0)
    assert not TelemetryAck(device_id="d", stored_seq=None, max_seq=3).confirms(0)  # stored, nothing settled


def test_messages_of_an_older_peer_still_read() -> None:
    old_ack = b'{"schema_version": 1, "device_id": "d", "stored_seq": 4, "max_seq": 9, "at": "2026-01-01T00:00:00Z"}'
    assert TelemetryAck.model_validate_json(old_ack).missing == []
    old_window = window("d", 7).model_dump(exclude={"prev_seq", "dropped_windows"})
    parsed = TelemetryWindow.model_validate(old_window)
    assert (parsed.prev_seq, parsed.dropped_windows) == (None, 0)  # no prev_seq: starts a chain of its own


def test_window_cannot_link_forward_and_ack_cannot_settle_above_its_highest() -> None:
    with pytest.raises(ValidationError, match="prev_seq"):
        TelemetryWindow.model_validate(window("d", 5).model_dump() | {"prev_seq": 5})
    with pytest.raises(ValidationError, match="above max_seq"):
        TelemetryAck(device_id="d", stored_seq=6, max_seq=5)
    with pytest.raises(ValidationError, match="first 4 is above last 3"):
        SeqRange(first=4, last=3)


# -- the coordinator's database ----------------------------------------------------------------------------


@pytest.fixture
def session(database_url: str) -> Iterator[Session]:
    engine = create_db_engine(database_url)
    init_db(engine)
    try:
        with Session(engine) as session:
            session.add(Device(id="edge-1", enrolment="enrolled"))
            session.commit()
            yield session
    finally:
        engine.dispose()


def arrive(session: Session, seq: int, prev: int | None = -1, dropped: int = 0) -> None:
    """Ingest window `seq` of edge-1, linked to `prev` (default: the seq below it)."""
    linked = (seq - 1 if seq > 0 else None) if prev == -1 else prev
    update = {"prev_seq": linked, "dropped_windows": dropped}
    assert ingest_telemetry(session=session, window=window("edge-1", seq).model_copy(update=update))


def events(session: Session, kind: str) -> list[str]:
    statement = select(DeviceEventRecord.message).where(DeviceEventRecord.kind == kind)
    return list(session.exec(statement.order_by(col(DeviceEventRecord.id))))


def test_hole_waits_out_its_grace_period_then_is_reported_once_and_passed(session: Session) -> None:
    for seq in (0, 1, 2, 4, 5):
        arrive(session, seq)
    start = utcnow()
    first = acknowledge_telemetry(session, "edge-1", now=start, grace_s=60)
    assert (first.ack.stored_seq, first.ack.max_seq, first.ack.missing) == (2, 5, [])
    assert first.recheck_s == pytest.approx(60)
    later = acknowledge_telemetry(session, "edge-1", now=start + timedelta(seconds=30), grace_s=60)
    assert later.ack.stored_seq == 2 and later.recheck_s == pytest.approx(30)  # the grace period is not reset
    assert get_device(session=session, device_id="edge-1").telemetry_gaps.count == 0  # pending is not reported
    over = acknowledge_telemetry(session, "edge-1", now=start + timedelta(seconds=61), grace_s=60)
    assert (over.ack.stored_seq, over.ack.missing, over.recheck_s) == (5, [SeqRange(first=3, last=3)], None)
    again = acknowledge_telemetry(session, "edge-1", now=start + timedelta(seconds=62), grace_s=60)
    assert again.ack.stored_seq == 5 and again.ack.missing == [SeqRange(first=3, last=3)]
    assert events(session, TELEMETRY_GAP) == ["telemetry window 3 never arrived within 60s: lost"]
    gaps = get_device(session=session, device_id="edge-1").telemetry_gaps
    assert (gaps.count, gaps.windows, gaps.ranges) == (1, 1, [(3, 3)])


def test_hole_filled_within_its_grace_period_is_never_reported(session: Session) -> None:
    for seq in (0, 2):
        arrive(session, seq)
    start = utcnow()
    assert acknowledge_telemetry(session, "edge-1", now=start, grace_s=60).ack.stored_seq == 0
    arrive(session, 1)  # the agent's outbox sent it again
    assert acknowledge_telemetry(session, "edge-1", now=start + timedelta(seconds=61), grace_s=60).ack.stored_seq == 2
    assert session.exec(select(TelemetryGap)).all() == [] and events(session, TELEMETRY_GAP) == []


def test_late_windows_shrink_a_reported_gap_and_fill_it(session: Session) -> None:
    for seq in (0, 1, 5):
        arrive(session, seq)
    start = utcnow()
    acknowledge_telemetry(session, "edge-1", now=start, grace_s=1)
    assert acknowledge_telemetry(session, "edge-1", now=start + timedelta(seconds=2), grace_s=1).ack.missing == [
        SeqRange(first=2, last=4)
    ]
    arrive(session, 3)
    assert get_device(session=session, device_id="edge-1").telemetry_gaps.ranges == [(2, 2), (4, 4)]
    arrive(session, 2)
    arrive(session, 4)
    ack = acknowledge_telemetry(session, "edge-1", now=start + timedelta(seconds=3), grace_s=1).ack
    assert (ack.stored_seq, ack.missing) == (5, [])
    assert get_device(session=session, device_id="edge-1").telemetry_gaps.count == 0
    assert len(events(session, TELEMETRY_GAP_FILLED)) == 2


def test_windows_a_device_dropped_are_counted_once_each(session: Session) -> None:
    arrive(session, 0)
    arrive(session, 4, prev=3, dropped=3)
    arrive(session, 5, dropped=3)  # the same count again: nothing new
    arrive(session, 6, dropped=4)
    assert get_device(session=session, device_id="edge-1").telemetry_dropped == 4
    assert events(session, TELEMETRY_DROPPED) == [
        "the device dropped 3 telemetry windows (its outbox was full); 3 in all",
        "the device dropped 1 telemetry windows (its outbox was full); 4 in all",
    ]


def test_cli_names_the_missing_seqs_and_the_dropped_windows() -> None:
    from cloud.cli.devices import _telemetry_lost
    from cloud.cli.fleet import _telemetry_health

    device = {"telemetry_gaps": {"count": 3, "windows": 6, "ranges": [[3, 3], [9, 12]]}, "telemetry_dropped": 2}
    assert _telemetry_lost(device) == "gaps 3, 9-12 (+1 more); 2 dropped"
    assert _telemetry_lost({"telemetry_gaps": {"count": 0, "windows": 0, "ranges": []}}) is None
    assert _telemetry_health({"telemetry_gaps": 1, "telemetry_dropped": 0}) == "1 gap"
    assert _telemetry_health({"telemetry_gaps": 0, "telemetry_dropped": 0}) is None
