"""Batched telemetry ingest on SQLite and PostgreSQL: exactly once by `(device, seq)`, rollups equal to the windows."""

from __future__ import annotations

import threading
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud.models import Device, EnrolmentState, TelemetryRecord
from cloud.models.telemetry import TelemetryRollup
from cloud.telemetry.ingest import Arrival, Outcome, store_windows
from cloud.telemetry.rollups import bucket_of, merge_counts, merge_histogram, rollup_series
from cloud.telemetry.summary import fleet_summary
from cloud.telemetry.windows import telemetry_totals
from protocol.messages import ModelRef, TelemetryWindow

T0 = datetime(2026, 12, 1, 10, 0, 0, tzinfo=UTC)


def enrol(engine: Engine, *device_ids: str, state: EnrolmentState = EnrolmentState.ENROLLED) -> None:
    with Session(engine) as session:
        for device_id in device_ids:
            session.add(Device(id=device_id, enrolment=state.value, tags={"site": "lab"}))
        session.commit()


def window(
    device_id: str, seq: int, *, count: int = 10, errors: int = 1, at: datetime = T0, version: str = "1.0"
) -> TelemetryWindow:
    return TelemetryWindow(
        device_id=device_id,
        seq=seq,
        prev_seq=seq - 1 if seq > 0 else None,
        window_start=at,
        window_end=at + timedelta(seconds=10),
        model=ModelRef(name="digits", version=version, sha256="a" * 64),
        inference_count=count,
        error_count=errors,
        latency_histogram=[count, seq % 3, 1],
        class_counts={str(seq % 4): count},
    )


def store(engine: Engine, windows: list[TelemetryWindow], live: bool = True) -> list[Outcome]:
    with Session(engine) as session:
        return [r.outcome for r in store_windows(session, [Arrival(w, live) for w in windows])]


def stored_seqs(engine: Engine, device_id: str) -> list[int]:
    with Session(engine) as session:
        statement = select(TelemetryRecord.seq).where(TelemetryRecord.device_id == device_id)
        return list(session.exec(statement.order_by(col(TelemetryRecord.seq))))


def rollups(engine: Engine, device_id: str) -> list[TelemetryRollup]:
    with Session(engine) as session:
        return rollup_series(session, device_ids=[device_id], model=None)


def sums_of(windows: list[TelemetryWindow]) -> tuple[int, int, int, list[int], dict[str, int]]:
    histogram: list[int] = []
    classes: dict[str, int] = {}
    for w in windows:
        histogram, classes = merge_histogram(histogram, w.latency_histogram), merge_counts(classes, w.class_counts)
    return (
        len(windows),
        sum(w.inference_count for w in windows),
        sum(w.error_count for w in windows),
        histogram,
        classes,
    )


def rollup_sums(rows: list[TelemetryRollup]) -> tuple[int, int, int, list[int], dict[str, int]]:
    histogram: list[int] = []
    classes: dict[str, int] = {}
    for r in rows:
        histogram, classes = merge_histogram(histogram, r.latency_histogram), merge_counts(classes, r.class_counts)
    return (
        sum(r.windows for r in rows),
        sum(r.inference_count for r in rows),
        sum(r.error_count for r in rows),
        histogram,
        classes,
    )


def test_same_window_twice_in_one_batch_and_across_batches_is_stored_once(engine: Engine) -> None:
    enrol(engine, "cam-1")
    first = store(engine, [window("cam-1", 0), window("cam-1", 1), window("cam-1", 0)])
    assert first == [Outcome.STORED, Outcome.STORED, Outcome.DUPLICATE]
    again = store(engine, [window("cam-1", 1), window("cam-1", 2), window("cam-1", 0)])  # a redelivered batch
    assert again == [Outcome.DUPLICATE, Outcome.STORED, Outcome.DUPLICATE]
    assert stored_seqs(engine, "cam-1") == [0, 1, 2]
    [row] = rollups(engine, "cam-1")
    assert (row.windows, row.inference_count, row.error_count) == (3, 30, 3), "a duplicate reached the rollup"
    with Session(engine) as session:
        assert telemetry_totals(session, ["cam-1"]) == {"cam-1": (30, 3, 3)}


@pytest.mark.parametrize("stranger", [None, EnrolmentState.REVOKED, EnrolmentState.PENDING])
def test_batch_with_a_window_of_a_device_not_enrolled_stores_the_others(
    engine: Engine, stranger: EnrolmentState | None
) -> None:
    enrol(engine, "cam-1")
    if stranger is not None:
        enrol(engine, "ghost", state=stranger)
    with Session(engine) as session:
        results = store_windows(
            session, [Arrival(window("cam-1", 0)), Arrival(window("ghost", 0)), Arrival(window("cam-1", 1))]
        )
    assert [r.outcome for r in results] == [Outcome.STORED, Outcome.REJECTED, Outcome.STORED]
    assert "ghost" in results[1].reason and "not enrolled" in results[1].reason
    assert stored_seqs(engine, "cam-1") == [0, 1] and stored_seqs(engine, "ghost") == []
    assert rollups(engine, "ghost") == []


def test_live_windows_move_last_seen_and_replayed_ones_do_not(engine: Engine) -> None:
    enrol(engine, "cam-1", "cam-2")
    store(engine, [window("cam-1", 0)], live=True)
    store(engine, [window("cam-2", 0)], live=False)
    with Session(engine) as session:
        assert session.get(Device, "cam-1").last_seen is not None  # type: ignore[union-attr]
        assert session.get(Device, "cam-2").last_seen is None  # type: ignore[union-attr]


def test_windows_fall_into_buckets_per_model_version(engine: Engine) -> None:
    enrol(engine, "cam-1")
    store(
        engine,
        [
            window("cam-1", 0, at=T0),
            window("cam-1", 1, at=T0 + timedelta(seconds=59)),
            window("cam-1", 2, at=T0 + timedelta(seconds=60)),
            window("cam-1", 3, at=T0 + timedelta(seconds=61), version="2.0"),
        ],
    )
    rows = rollups(engine, "cam-1")
    assert [(r.bucket_start, r.model_version, r.windows) for r in rows] == [
        (T0, "1.0", 2),
        (T0 + timedelta(seconds=60), "1.0", 1),
        (T0 + timedelta(seconds=60), "2.0", 1),
    ]
    with Session(engine) as session:
        later = rollup_series(session, device_ids=["cam-1"], model="digits", since=T0 + timedelta(seconds=60))
        assert [r.model_version for r in later] == ["1.0", "2.0"]
        assert rollup_series(session, device_ids=["cam-1"], model="other") == []


windows_strategy = st.lists(
    st.tuples(
        st.integers(0, 40),  # seq (repeats are redeliveries)
        st.integers(0, 1000),  # inferences
        st.integers(0, 50),  # errors
        st.integers(0, 300),  # seconds after T0
        st.sampled_from(["1.0", "2.0"]),
    ),
    min_size=1,
    max_size=30,
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batches=st.lists(windows_strategy, min_size=1, max_size=3))
def test_rollup_sums_equal_the_sums_of_the_stored_windows(engine: Engine, batches: list[list[tuple]]) -> None:
    device_id = f"d-{uuid.uuid4().hex[:8]}"
    enrol(engine, device_id)
    first: dict[int, TelemetryWindow] = {}
    for batch in batches:
        windows = [
            window(device_id, s, count=n, errors=e, at=T0 + timedelta(seconds=t), version=v) for s, n, e, t, v in batch
        ]
        store(engine, windows)
        for w in windows:
            first.setdefault(w.seq, w)
    assert stored_seqs(engine, device_id) == sorted(first)
    kept = list(first.values())
    assert rollup_sums(rollups(engine, device_id)) == sums_of(kept)
    for row in rollups(engine, device_id):  # and per bucket and version
        own = [
            w
            for w in kept
            if bucket_of(w.window_start, 60) == row.bucket_start and w.model and w.model.version == row.model_version
        ]
        assert rollup_sums([row]) == sums_of(own)


def test_concurrent_batches_lose_no_rollup_increment(engine: Engine) -> None:
    enrol(engine, "cam-1", "cam-2")
    threads, per_thread, errors = 4, 25, []

    def ingest(part: int) -> None:
        try:
            for n in range(per_thread):
                seq = part * 1000 + n
                store(engine, [window("cam-1", seq, count=1, errors=0), window("cam-2", seq, count=2, errors=1)])
        except Exception as exc:
            errors.append(exc)

    workers = [threading.Thread(target=ingest, args=(part,)) for part in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert errors == []
    [one], [two] = rollups(engine, "cam-1"), rollups(engine, "cam-2")
    total = threads * per_thread
    assert (one.windows, one.inference_count, one.error_count) == (total, total, 0)
    assert (two.windows, two.inference_count, two.error_count) == (total, 2 * total, total)
    assert sum(one.class_counts.values()) == total and one.latency_histogram[0] == total


def test_fleet_summary_reads_the_rollups(engine: Engine) -> None:
    enrol(engine, "cam-1", "cam-2")
    store(engine, [window("cam-1", 0, count=4), window("cam-1", 1, count=6), window("cam-2", 0, count=5)])
    with Session(engine) as session:
        summary = fleet_summary(session=session)
        session.exec(select(TelemetryRecord)).all()
    lines = {line.device_id: line for line in summary.devices}
    assert (lines["cam-1"].inference_count, lines["cam-2"].inference_count, summary.inference_count) == (10, 5, 15)
    assert summary.error_count == 3
