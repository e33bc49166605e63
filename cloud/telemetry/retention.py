"""Retention: raw telemetry windows deleted after `telemetry_retention_days`, rollups after `rollup_retention_days`,
drift rollups after `drift_rollup_retention_days`.

Deletes run in bounded batches, one transaction each, so the bridge keeps ingesting between them. A window is
deleted only when its device's chain is settled past it (`TelemetryChain.settled_seq`): the chain walk never
meets a hole retention made. The highest deleted seq is kept per device (`TelemetryChain.pruned_seq`, raised in
the same transaction), so the acknowledgement's `max_seq` never drops (an agent that lost its seq counter still
continues above it) and a resend of a deleted window is known as a duplicate (`cloud.telemetry.ingest`). Gaps,
chains and rollups stay: what a device's acknowledgement says does not change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud.models import TelemetryRecord
from cloud.models.telemetry import DriftRollup, TelemetryChain, TelemetryRollup
from protocol.messages import utcnow

__all__ = ["DELETE_BATCH", "Pruned", "prune_drift_rollups", "prune_rollups", "prune_telemetry", "prune_windows"]

log = logging.getLogger(__name__)

DELETE_BATCH = 5000  # rows per delete transaction: bounds how long one holds the write lock


@dataclass(frozen=True)
class Pruned:
    """How many raw windows, rollup rows and drift rollup rows one retention pass deleted."""

    windows: int
    rollups: int
    drift_rollups: int = 0


def prune_windows(session: Session, *, before: datetime, limit: int = DELETE_BATCH) -> int:
    """Delete up to `limit` windows received before `before` that their device's chain settled; committed."""
    chain = TelemetryChain
    statement = (
        select(TelemetryRecord.id, TelemetryRecord.device_id, TelemetryRecord.seq)
        .join(chain, col(chain.device_id) == col(TelemetryRecord.device_id))
        .where(
            col(TelemetryRecord.received_at) < before,
            col(chain.settled_seq).is_not(None),
            col(TelemetryRecord.seq) <= col(chain.settled_seq),
        )
        .order_by(col(TelemetryRecord.id))
        .limit(limit)
    )
    rows = list(session.exec(statement))
    if not rows:
        return 0
    highest: dict[str, int] = {}
    for _id, device_id, seq in rows:
        highest[device_id] = max(seq, highest.get(device_id, seq))
    locked = select(chain).where(col(chain.device_id).in_(sorted(highest))).order_by(col(chain.device_id))
    for row in session.exec(locked.with_for_update()):  # PostgreSQL: ingest reads pruned_seq under FOR SHARE
        if row.pruned_seq is None or highest[row.device_id] > row.pruned_seq:
            row.pruned_seq = highest[row.device_id]
            session.add(row)
    session.flush()
    session.connection().execute(delete(TelemetryRecord).where(col(TelemetryRecord.id).in_([r[0] for r in rows])))
    session.commit()
    return len(rows)


def prune_rollups(session: Session, *, before: datetime, limit: int = DELETE_BATCH) -> int:
    """Delete up to `limit` rollup rows whose bucket starts before `before`; committed."""
    ids = list(
        session.exec(
            select(TelemetryRollup.id)
            .where(col(TelemetryRollup.bucket_start) < before)
            .order_by(col(TelemetryRollup.bucket_start))
            .limit(limit)
        )
    )
    if not ids:
        return 0
    session.connection().execute(delete(TelemetryRollup).where(col(TelemetryRollup.id).in_(ids)))
    session.commit()
    return len(ids)


def prune_drift_rollups(session: Session, *, before: datetime, limit: int = DELETE_BATCH) -> int:
    """Delete up to `limit` drift rollup rows whose bucket starts before `before`; committed."""
    ids = list(
        session.exec(
            select(DriftRollup.id)
            .where(col(DriftRollup.bucket_start) < before)
            .order_by(col(DriftRollup.bucket_start))
            .limit(limit)
        )
    )
    if not ids:
        return 0
    session.connection().execute(delete(DriftRollup).where(col(DriftRollup.id).in_(ids)))
    session.commit()
    return len(ids)


def prune_telemetry(
    engine: Engine,
    *,
    window_days: float,
    rollup_days: float,
    now: datetime | None = None,
    batch: int = DELETE_BATCH,
    max_batches: int = 1000,
    drift_rollup_days: float | None = None,
) -> Pruned:
    """One retention pass: old windows, then old rollups and drift rollups (kept `rollup_days` unless
    `drift_rollup_days`), `batch` rows per transaction until none is left."""
    now = now or utcnow()
    counts = []
    passes = (
        (prune_windows, window_days),
        (prune_rollups, rollup_days),
        (prune_drift_rollups, rollup_days if drift_rollup_days is None else drift_rollup_days),
    )
    for prune, days in passes:
        total = 0
        for _ in range(max_batches):
            with Session(engine, expire_on_commit=False) as session:
                deleted = prune(session, before=now - timedelta(days=days), limit=batch)
            total += deleted
            if deleted < batch:
                break
        counts.append(total)
    pruned = Pruned(windows=counts[0], rollups=counts[1], drift_rollups=counts[2])
    if pruned.windows or pruned.rollups or pruned.drift_rollups:
        log.info(
            "telemetry retention deleted windows=%d rollups=%d drift_rollups=%d",
            pruned.windows, pruned.rollups, pruned.drift_rollups,
        )  # fmt: skip
    return pruned
