"""Ingest and acknowledgements in a few statements per batch (issue 13), on SQLite and PostgreSQL: the batch insert
as one statement with one JSON parameter, rollups in two, and many devices acknowledged in one pass."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import numpy as np
import pytest
from sqlalchemy import event, func, text
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

import cloud.telemetry.gaps as gaps
from cloud.models import Device, EnrolmentState, TelemetryChain, TelemetryRecord
from cloud.models._common import as_utc
from cloud.models.telemetry import TelemetryRollup
from cloud.outage import is_transient
from cloud.telemetry.acks import acknowledge_devices, acknowledge_telemetry
from cloud.telemetry.ingest import Arrival, Outcome, store_windows
from protocol.messages import LabelCounts, ModelRef, SeqRange, TelemetryAck, TelemetryWindow, utcnow

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def enrol(engine: Engine, *device_ids: str) -> None:
    with Session(engine) as session:
        for device_id in device_ids:
            session.add(Device(id=device_id, enrolment=EnrolmentState.ENROLLED.value))
        session.commit()


def window(device_id: str, seq: int, *, prev: int | None = -1, **fields: object) -> TelemetryWindow:
    values: dict[str, object] = {
        "device_id": device_id,
        "seq": seq,
        "prev_seq": (seq - 1 if seq > 0 else None) if prev == -1 else prev,
        "window_start": T0 + timedelta(seconds=10 * (seq % 1000)),
        "window_end": T0 + timedelta(seconds=10 * (seq % 1000) + 10),
        "model": ModelRef(name="digits", version="1.0", sha256="a" * 64),
        "inference_count": 10,
        "error_count": 1,
        "latency_histogram": [7, 2, 1],
        "class_counts": {"3": 10},
    }
    return TelemetryWindow.model_validate(values | fields)


def store(engine: Engine, windows: list[TelemetryWindow]) -> list[Outcome]:
    with Session(engine) as session:
        return [r.outcome for r in store_windows(session, [Arrival(w) for w in windows])]


def rows(engine: Engine) -> list[TelemetryRecord]:
    with Session(engine) as session:
        return list(session.exec(select(TelemetryRecord).order_by(TelemetryRecord.device_id, TelemetryRecord.seq)))


# -- the batch insert ---------------------------------------------------------------------------------


def test_window_beyond_64_bits_fails_its_batch_whole_and_then_only_itself(engine: Engine) -> None:
    enrol(engine, "edge-1")
    batch = [window("edge-1", 0), window("edge-1", 2**64, prev=None), window("edge-1", 1)]
    with pytest.raises(Exception) as refused:
        store(engine, batch)
    assert not is_transient(refused.value)  # the bridge stores the batch window by window, it does not wait
    assert rows(engine) == []  # nothing of the failed batch was kept
    assert store(engine, [batch[0]]) == [Outcome.STORED]
    with pytest.raises(Exception) as alone:
        store(engine, [batch[1]])
    assert not is_transient(alone.value)
    assert store(engine, [batch[2]]) == [Outcome.STORED]
    assert [r.seq for r in rows(engine)] == [0, 1]
    with Session(engine) as session:
        [rollup] = session.exec(select(TelemetryRollup)).all()
    assert (rollup.windows, rollup.inference_count, rollup.latency_histogram) == (2, 20, [14, 4, 2])


def test_stored_window_reads_back_as_it_was_sent(engine: Engine) -> None:
    enrol(engine, "edge-1")
    labels = LabelCounts(labelled=3, correct=2, by_class={"3": [2, 2], "5": [1, 0]}, abs_error_sum=0.125)
    odd = {'quote " and é': 4, "3": 6}
    sent = [
        window("edge-1", 0, class_counts=odd, labels=labels, latency_histogram=[0, 2**40, 1]),
        window("edge-1", 1, window_start=T0 + timedelta(microseconds=123456), window_end=T0 + timedelta(seconds=9)),
    ]
    before = utcnow()
    assert store(engine, sent) == [Outcome.STORED, Outcome.STORED]
    first, second = rows(engine)
    assert (first.class_counts, first.latency_histogram, first.labels) == (odd, [0, 2**40, 1], labels.model_dump())
    assert (first.model_name, first.model_version, first.prev_seq, second.prev_seq) == ("digits", "1.0", None, 0)
    assert as_utc(second.window_start) == T0 + timedelta(microseconds=123456)
    assert (as_utc(second.received_at) or T0) >= before - timedelta(seconds=1)
    with engine.connect() as connection:  # no sketches, no labels: SQL NULL (as on PostgreSQL), not JSON null
        nulls = connection.execute(
            text("SELECT count(*) FROM telemetry_window WHERE sketches IS NULL AND (seq = 0 OR labels IS NULL)")
        ).scalar_one()
    assert nulls == 2


# -- acknowledgements ------------------------------------------------------------------------------


def build_fleet(engine: Engine, prefix: str) -> list[str]:
    """Devices in every state an acknowledgement knows, their ids starting with `prefix`."""
    names = ["linked", "hole", "reported", "jump", "pages", "none", "pruned"]
    ids = [f"{prefix}{name}" for name in names]
    enrol(engine, *ids)
    p = prefix
    store(engine, [window(f"{p}linked", s) for s in range(5)])
    store(engine, [window(f"{p}hole", s) for s in (0, 1, 2, 4, 5)])
    store(engine, [window(f"{p}reported", s) for s in (0, 1, 3, 4)])
    store(engine, [window(f"{p}jump", s) for s in (0, 1, 2)] + [window(f"{p}jump", 1003, prev=None)])
    store(engine, [window(f"{p}jump", 1004)] + [window(f"{p}pages", s) for s in range(10)])
    with Session(engine) as session:  # retention deleted every window of this one, up to 50
        session.add(TelemetryChain(device_id=f"{p}pruned", settled_seq=50, pruned_seq=50))
        session.commit()
    return ids


def comparable(ack: TelemetryAck) -> tuple[object, ...]:
    # An ack of nothing stored carries the time it was made, not the pass's `now` (as before the one-pass path).
    return (ack.stored_seq, ack.max_seq, ack.missing, ack.at if ack.max_seq is not None else None)


def test_many_devices_acknowledged_in_one_pass_get_the_acks_each_would_alone(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gaps, "_PAGE", 3)  # "pages" walks on past its first page, with queries of its own
    alone, together = build_fleet(engine, "a-"), build_fleet(engine, "b-")
    start = utcnow()
    for now in (start, start + timedelta(seconds=61)):  # the second pass reports the holes still open as gaps
        with Session(engine) as session:
            one_by_one = {d: acknowledge_telemetry(session, d, now=now, grace_s=60) for d in alone}
        with Session(engine) as session:
            in_one_pass = acknowledge_devices(session, together, now=now, grace_s=60)
        for a, b in zip(alone, together, strict=True):
            assert comparable(in_one_pass[b].ack) == comparable(one_by_one[a].ack), a
            assert in_one_pass[b].recheck_s == one_by_one[a].recheck_s, a
    acks = {d.removeprefix("b-"): in_one_pass[d].ack for d in together}
    expected = {
        "linked": (4, 4, []),
        "hole": (5, 5, [SeqRange(first=3, last=3)]),
        "reported": (4, 4, [SeqRange(first=2, last=2)]),
        "jump": (1004, 1004, []),
        "pages": (9, 9, []),
        "none": (None, None, []),
        "pruned": (50, 50, []),
    }
    assert {d: (a.stored_seq, a.max_seq, a.missing) for d, a in acks.items()} == expected


def test_acknowledging_forty_devices_takes_as_many_statements_as_two(engine: Engine) -> None:
    ids = [f"edge-{i:02d}" for i in range(40)]
    enrol(engine, *ids)
    store(engine, [window(d, s) for d in ids for s in range(3)])

    def statements(device_ids: list[str]) -> int:
        count = [0]

        def counted(*_args: object) -> None:
            count[0] += 1

        event.listen(engine, "before_cursor_execute", counted)
        try:
            with Session(engine) as session:
                answers = acknowledge_devices(session, device_ids)
        finally:
            event.remove(engine, "before_cursor_execute", counted)
        assert all(a.ack.stored_seq == 2 for a in answers.values())
        return count[0]

    assert statements(ids[:2]) == statements(ids[2:]) <= 10
    with Session(engine) as session:
        settled = session.exec(select(func.count()).where(TelemetryChain.settled_seq == 2)).one()
    assert settled == 40


def test_sketches_are_stored_as_sent_beside_windows_without_any(engine: Engine) -> None:
    from cloud.drift.rollups import decode_sketches
    from protocol import Predictions, SketchSet

    enrol(engine, "edge-1", "edge-2")
    sketched = SketchSet("input")
    sketched.update(np.linspace(0.0, 1.0, 64 * 20).reshape(20, 64), Predictions(top1=np.full(20, 0.9)))
    wire = sketched.to_wire()
    assert wire is not None
    sent = [window("edge-1", 0, sketches=wire), window("edge-2", 0), window("edge-1", 1, sketches=wire)]
    assert store(engine, sent) == [Outcome.STORED] * 3
    first, second, plain = rows(engine)
    assert first.sketches == second.sketches == wire.model_dump(mode="json")
    assert plain.sketches is None
    decoded, reason = decode_sketches(first.sketches)
    assert reason is None and decoded is not None and decoded.rows == 20


def test_batch_larger_than_one_sqlite_statement_is_stored_whole_and_once(engine: Engine) -> None:
    # SQLite binds at most 32,766 parameters a statement: a batch of 2,500 windows takes two of them.
    enrol(engine, "edge-1")
    batch = [window("edge-1", seq) for seq in range(2500)]
    assert store(engine, batch) == [Outcome.STORED] * 2500
    assert store(engine, [*batch[2400:], window("edge-1", 2500)]) == [Outcome.DUPLICATE] * 100 + [Outcome.STORED]
    with Session(engine) as session:
        assert session.exec(select(func.count()).select_from(TelemetryRecord)).one() == 2501
