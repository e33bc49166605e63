"""Batched telemetry ingest: a batch of windows stored in one transaction, exactly once per `(device, seq)`.

`store_windows` is the one path every window takes (the bridge's batches, and `ingest_telemetry` for one):

1. windows of devices that are not enrolled are rejected with the reason, the rest go on;
2. `last_seen` moves once per device (live windows only: a replayed one is no sign of life);
3. duplicates inside the batch, and windows retention already deleted (at or below the device's `pruned_seq`,
   outside a reported gap), are dropped;
4. `INSERT ... ON CONFLICT (device_id, seq) DO NOTHING RETURNING` stores the rest and says which were new;
5. only the new windows add to the rollups (`cloud.telemetry.rollups`) and shrink reported gaps or raise the
   dropped count (`cloud.telemetry.gaps.windows_stored`);
6. one commit.

An error in any step rolls the whole batch back; the caller (the bridge) then retries it window by window, so
one window the database refuses costs only itself.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import text, update
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from cloud.models import Device, EnrolmentState, TelemetryGap, TelemetryRecord
from cloud.models.telemetry import TelemetryChain
from cloud.telemetry.gaps import windows_stored
from cloud.telemetry.rollups import DEFAULT_BUCKET_S, apply_rollups, rollup_deltas
from protocol.messages import TelemetryWindow, utcnow

__all__ = ["Arrival", "Outcome", "Stored", "store_windows"]


@dataclass(frozen=True)
class Arrival:
    """A decoded window and whether it came live (False: the broker replayed it from its store)."""

    window: TelemetryWindow
    live: bool = True


class Outcome(StrEnum):
    """What became of one window of a batch."""

    STORED = "stored"
    DUPLICATE = "duplicate"
    REJECTED = "rejected"  # its device is not enrolled: the reason says why


@dataclass(frozen=True)
class Stored:
    """The outcome of one window, and the reason when it was rejected."""

    outcome: Outcome
    reason: str = ""


def _not_enrolled(device_id: str, device: Device | None) -> str:
    if device is None:
        return f"device {device_id!r} is not enrolled"
    return f"device {device_id!r} is {device.enrolment}, not enrolled"


def _record(window: TelemetryWindow, received_at: datetime) -> dict[str, Any]:
    model = window.model
    return {
        "device_id": window.device_id,
        "seq": window.seq,
        "prev_seq": window.prev_seq,
        "window_start": window.window_start,
        "window_end": window.window_end,
        "model_name": model.name if model else None,
        "model_version": model.version if model else None,
        "model_sha256": model.sha256 if model else None,
        "inference_count": window.inference_count,
        "error_count": window.error_count,
        "latency_histogram": list(window.latency_histogram),
        "class_counts": dict(window.class_counts),
        "sketches": window.sketches.model_dump(mode="json") if window.sketches is not None else None,
        "received_at": received_at,
    }


def store_windows(
    session: Session, arrivals: Sequence[Arrival], *, bucket_s: int = DEFAULT_BUCKET_S, now: datetime | None = None
) -> list[Stored]:
    """Store `arrivals` in one transaction (committed); one `Stored` per arrival, in order."""
    now = now or utcnow()
    postgres = session.get_bind().dialect.name == "postgresql"
    ids = sorted({a.window.device_id for a in arrivals})
    devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))}
    enrolled = {i for i, d in devices.items() if d.enrolment == EnrolmentState.ENROLLED}
    results: list[Stored | None] = [None] * len(arrivals)
    for index, arrival in enumerate(arrivals):
        device_id = arrival.window.device_id
        if device_id not in enrolled:
            results[index] = Stored(Outcome.REJECTED, _not_enrolled(device_id, devices.get(device_id)))
    live = sorted({a.window.device_id for a in arrivals if a.live and a.window.device_id in enrolled})
    if live:
        session.connection().execute(update(Device).where(col(Device.id).in_(live)).values(last_seen=now))
    candidates = _candidates(session, arrivals, results, enrolled, postgres)
    new: set[tuple[str, int]] = set()
    if candidates:
        rows = [_record(arrivals[i].window, now) for i in sorted(candidates.values(), key=_by_key(arrivals))]
        new = _insert_new(session, rows, postgres)
    fresh = []
    for key, index in candidates.items():
        if key in new:
            results[index] = Stored(Outcome.STORED)
            fresh.append(arrivals[index].window)
    apply_rollups(session, rollup_deltas(fresh, bucket_s))
    windows_stored(session, fresh)
    session.commit()
    return [result or Stored(Outcome.DUPLICATE) for result in results]


# PostgreSQL: the whole batch as one array per column (13 parameters, not 13 per row: a statement of thousands of
# placeholders costs more to build and parse than to run).
_PG_INSERT = text(
    "INSERT INTO telemetry_window (device_id, seq, prev_seq, window_start, window_end, model_name, model_version, "
    "model_sha256, inference_count, error_count, latency_histogram, class_counts, sketches, received_at) "
    "SELECT * FROM unnest(CAST(:device_id AS varchar[]), CAST(:seq AS bigint[]), CAST(:prev_seq AS bigint[]), "
    "CAST(:window_start AS timestamptz[]), CAST(:window_end AS timestamptz[]), CAST(:model_name AS varchar[]), "
    "CAST(:model_version AS varchar[]), CAST(:model_sha256 AS varchar[]), CAST(:inference_count AS integer[]), "
    "CAST(:error_count AS integer[]), CAST(CAST(:latency_histogram AS text[]) AS json[]), "
    "CAST(CAST(:class_counts AS text[]) AS json[]), CAST(CAST(:sketches AS text[]) AS json[]), "
    "CAST(:received_at AS timestamptz[])) "
    "ON CONFLICT (device_id, seq) DO NOTHING RETURNING device_id, seq"
)
_JSON_COLUMNS = ("latency_histogram", "class_counts", "sketches")


def _pg_value(name: str, value: Any) -> Any:
    """A row's value in the PostgreSQL arrays: JSON columns as text (SQL NULL stays NULL, not JSON null)."""
    return json.dumps(value) if name in _JSON_COLUMNS and value is not None else value


def _insert_new(session: Session, rows: list[dict[str, Any]], postgres: bool) -> set[tuple[str, int]]:
    """Insert `rows`, skipping `(device_id, seq)` already stored; the keys that were new."""
    if postgres:
        columns = {name: [_pg_value(name, r[name]) for r in rows] for name in rows[0]}
        result = session.connection().execute(_PG_INSERT, columns)
    else:
        statement = (
            sqlite_insert(TelemetryRecord.__table__)  # type: ignore[attr-defined]
            .on_conflict_do_nothing(index_elements=["device_id", "seq"])
            .returning(col(TelemetryRecord.device_id), col(TelemetryRecord.seq))
        )
        result = session.connection().execute(statement, rows)
    return {(r[0], int(r[1])) for r in result}


def _by_key(arrivals: Sequence[Arrival]) -> Any:
    return lambda index: (arrivals[index].window.device_id, arrivals[index].window.seq)


def _candidates(
    session: Session, arrivals: Sequence[Arrival], results: list[Stored | None], enrolled: set[str], postgres: bool
) -> dict[tuple[str, int], int]:
    """(device, seq) → index of its first arrival, for windows that may be new (duplicates left unset)."""
    first: dict[tuple[str, int], int] = {}
    for index, arrival in enumerate(arrivals):
        if results[index] is None:
            first.setdefault((arrival.window.device_id, arrival.window.seq), index)
    if not first:
        return first
    chains = select(TelemetryChain.device_id, TelemetryChain.pruned_seq).where(
        col(TelemetryChain.device_id).in_(sorted({d for d, _ in first}))
    )
    if postgres:
        # Retention raises pruned_seq under FOR UPDATE: read it under FOR SHARE, so a window it is deleting
        # right now is either still there (the insert conflicts) or already counted as pruned.
        chains = chains.with_for_update(read=True)
    pruned = {device_id: int(seq) for device_id, seq in session.exec(chains) if seq is not None}
    old = [(d, s) for d, s in first if d in pruned and s <= pruned[d]]
    if old:
        late = _in_reported_gaps(session, old)
        for key in old:
            if key not in late:  # stored once already, then deleted by retention: a resend
                del first[key]
    return first


def _in_reported_gaps(session: Session, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of `keys` lie in a reported gap of their device (late windows, never stored)."""
    statement = select(TelemetryGap.device_id, TelemetryGap.first_seq, TelemetryGap.last_seq).where(
        col(TelemetryGap.device_id).in_(sorted({d for d, _ in keys})), col(TelemetryGap.reported_at).is_not(None)
    )
    gaps = list(session.exec(statement))
    return {(d, s) for d, s in keys if any(g[0] == d and g[1] <= s <= g[2] for g in gaps)}
