"""Retention on SQLite and PostgreSQL: old raw windows go, rollups and what acknowledgements say stay."""

from __future__ import annotations

import time
from datetime import timedelta

from sqlalchemy.engine import Engine
from sqlmodel import Session

from cloud.models import TelemetryGap
from cloud.telemetry.acks import telemetry_ack
from cloud.telemetry.ingest import Arrival, Outcome, store_windows
from cloud.telemetry.retention import prune_telemetry
from protocol.messages import utcnow
from tests.cloud.test_telemetry_ingest import enrol, rollups, stored_seqs, window


def store_at(engine: Engine, windows: list, days_ago: float) -> list[Outcome]:
    with Session(engine) as session:
        now = utcnow() - timedelta(days=days_ago)
        return [r.outcome for r in store_windows(session, [Arrival(w) for w in windows], now=now)]


def ack(engine: Engine, device_id: str) -> tuple[int | None, int | None, list[tuple[int, int]]]:
    with Session(engine) as session:
        answer = telemetry_ack(session, device_id, grace_s=0.001)
    return answer.stored_seq, answer.max_seq, [(m.first, m.last) for m in answer.missing]


def test_retention_deletes_old_windows_keeps_rollups_and_acknowledgements(engine: Engine) -> None:
    enrol(engine, "cam-1")
    store_at(engine, [window("cam-1", s) for s in range(10)], days_ago=20)
    store_at(engine, [window("cam-1", s) for s in range(10, 13)], days_ago=1)
    before = ack(engine, "cam-1")
    assert before == (12, 12, [])
    totals = [(r.windows, r.inference_count) for r in rollups(engine, "cam-1")]
    pruned = prune_telemetry(engine, window_days=14, rollup_days=400, batch=4)  # three bounded batches
    assert (pruned.windows, pruned.rollups) == (10, 0)
    assert stored_seqs(engine, "cam-1") == [10, 11, 12]
    assert [(r.windows, r.inference_count) for r in rollups(engine, "cam-1")] == totals == [(13, 130)]
    assert ack(engine, "cam-1") == before
    # A resend of a deleted window is a duplicate (its counts are in the rollups already); the chain goes on.
    assert store_at(engine, [window("cam-1", 3), window("cam-1", 13)], days_ago=0) == [
        Outcome.DUPLICATE,
        Outcome.STORED,
    ]
    assert ack(engine, "cam-1") == (13, 13, [])
    assert rollups(engine, "cam-1")[0].windows == 14


def test_every_window_deleted_keeps_max_seq_for_an_agent_that_lost_its_counter(engine: Engine) -> None:
    enrol(engine, "cam-1")
    store_at(engine, [window("cam-1", s) for s in range(5)], days_ago=30)
    assert ack(engine, "cam-1") == (4, 4, [])
    prune_telemetry(engine, window_days=14, rollup_days=400)
    assert stored_seqs(engine, "cam-1") == []
    assert ack(engine, "cam-1") == (4, 4, []), "max_seq dropped: the agent would reuse seqs"


def test_windows_above_the_settled_chain_are_kept_until_it_settles(engine: Engine) -> None:
    enrol(engine, "cam-1")
    store_at(engine, [window("cam-1", 0), window("cam-1", 1), window("cam-1", 4)], days_ago=30)
    with Session(engine) as session:  # settle with a real grace period: 2..3 is a pending hole
        assert telemetry_ack(session, "cam-1").stored_seq == 1
    prune_telemetry(engine, window_days=14, rollup_days=400)
    assert stored_seqs(engine, "cam-1") == [4], "a window past the settled chain was deleted: a false gap"


def test_late_window_of_a_reported_gap_below_the_pruned_seq_is_stored(engine: Engine) -> None:
    enrol(engine, "cam-1")
    store_at(engine, [window("cam-1", 0), window("cam-1", 1), window("cam-1", 4)], days_ago=30)
    assert ack(engine, "cam-1") == (1, 4, [])  # the hole 2..3 is pending
    time.sleep(0.01)  # its (tiny) grace period
    assert ack(engine, "cam-1") == (4, 4, [(2, 3)])  # reported lost
    prune_telemetry(engine, window_days=14, rollup_days=400)
    assert stored_seqs(engine, "cam-1") == []
    assert store_at(engine, [window("cam-1", 2), window("cam-1", 1)], days_ago=0) == [
        Outcome.STORED,
        Outcome.DUPLICATE,
    ]
    assert ack(engine, "cam-1") == (4, 4, [(3, 3)])
    with Session(engine) as session:
        assert session.get(TelemetryGap, 1) is None or session.get(TelemetryGap, 1).first_seq == 3  # type: ignore[union-attr]


def test_rollups_older_than_their_retention_are_deleted(engine: Engine) -> None:
    enrol(engine, "cam-1")
    old, recent = utcnow() - timedelta(days=500), utcnow() - timedelta(days=2)
    store_at(engine, [window("cam-1", 0, at=old), window("cam-1", 1, at=recent)], days_ago=0)
    pruned = prune_telemetry(engine, window_days=14, rollup_days=400)
    assert (pruned.windows, pruned.rollups) == (0, 1)
    assert [r.windows for r in rollups(engine, "cam-1")] == [1]
