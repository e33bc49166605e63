"""Drift rollups: per device, model version and time bucket (by window end), the merged sketches, class counts and
label sums of its telemetry windows, so that drift queries do not decode every window of their range.

Compaction (`compact_drift`, a periodic job of the coordinator, never on the ingest path) merges the windows stored
since its mark (`DriftRollupMark.window_id`: every window with an id up to it is in the rollups) into their
buckets, late windows included: a window delivered hours late has an id above the mark, whatever its bucket.
Each batch is exactly once:

1. the ceiling: the highest window id below which no insert is still in flight. PostgreSQL hands out ids before
   commit, so a transaction may commit id 7 after another committed id 8; a short transaction takes `SHARE` lock on
   the table (it waits for the inserts in flight, and holds new ones back for the time of one `max(id)`), reads
   `max(id)` and ends. SQLite has one writer at a time: its ids commit in order.
2. the windows `mark < id <= ceiling` are read and merged per bucket in memory (no write lock held meanwhile);
3. one transaction moves the mark only if it is still where step 2 read it (a concurrent compactor moved it:
   roll back, nothing written) and adds the merged buckets to the stored rollups. A crash before its commit leaves
   mark and rollups as they were; the next run merges the same windows again, once.

Drift queries (`cloud.drift.service`) read, in one statement, the mark and the rollups of the buckets that start in
their range, then the raw windows of the partial bucket at the start of the range and those above the mark. The
bucket length is the mark's (`drift_rollup_bucket_s` when compaction first ran), so one length holds for every
rollup and the partial bucket is exactly the windows no rollup read here holds. Sketches are decoded
only through `protocol.sketches` (the DataSketches library crashes on some malformed bytes).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import and_, func, text, update
from sqlalchemy import select as core_select
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud.drift.labels import LabelSums
from cloud.models import TelemetryRecord
from cloud.models.telemetry import DriftRollup, DriftRollupMark
from cloud.telemetry.rollups import bucket_of
from protocol.errors import ProtocolError
from protocol.messages import utcnow
from protocol.sketches import SketchSet, WindowSketches

__all__ = [
    "BATCH",
    "Compacted",
    "Mark",
    "Merged",
    "StoredRollup",
    "compact_drift",
    "compact_drift_batch",
    "decode_sketches",
    "edge_of",
    "merge_into",
    "read_rollups",
]

log = logging.getLogger(__name__)

BATCH = 2000  # windows per compaction transaction
_MARK_ID = 1
_LOCK_TIMEOUT = "10s"


def decode_sketches(raw: Mapping[str, Any] | None) -> tuple[SketchSet | None, str | None]:
    """Stored sketches decoded through `protocol.sketches`; (None, reason) when they do not decode."""
    if not raw:
        return None, None
    try:
        return SketchSet.from_wire(WindowSketches.model_validate(raw)), None
    except (ValueError, ProtocolError) as exc:
        return None, str(exc)


def merge_into(current: SketchSet | None, sketches: SketchSet) -> tuple[SketchSet | None, str | None]:
    """`current` with `sketches` merged in (a new set when there is none yet), and None; or `current` unchanged and
    the reason when they do not fit (another input layout: nothing merged)."""
    target = current if current is not None else SketchSet()
    try:
        target.merge(sketches)
    except (ValueError, ProtocolError) as exc:
        return current, str(exc)
    return target, None


@dataclass
class Merged:
    """Windows merged together (one bucket of one device, or one cohort)."""

    windows: int = 0
    inferences: int = 0
    unreadable: int = 0
    sketches: SketchSet | None = None
    class_counts: Counter[str] = field(default_factory=Counter)
    labels: LabelSums = field(default_factory=LabelSums)

    def add_sketches(self, sketches: SketchSet) -> str | None:
        """Merge `sketches` in; the reason when they do not fit (another input layout: nothing merged)."""
        self.sketches, reason = merge_into(self.sketches, sketches)
        return reason

    def add_window(self, inferences: int, classes: Mapping[str, Any] | None, raw: Any, labels: Any) -> str | None:
        """Add one stored window; the reason when its sketches were skipped (counted unreadable)."""
        self.windows += 1
        self.inferences += int(inferences)
        self.class_counts.update({str(k): int(v) for k, v in (classes or {}).items()})
        self.labels.add(labels)
        sketches, reason = decode_sketches(raw)
        if sketches is not None:
            reason = self.add_sketches(sketches)
        if reason is not None:
            self.unreadable += 1
        return reason


@dataclass(frozen=True)
class StoredRollup:
    """One rollup row as a drift query reads it."""

    device_id: str
    windows: int
    inferences: int
    unreadable: int
    sketches: dict[str, Any] | None
    class_counts: dict[str, int]
    labels: dict[str, Any] | None


def edge_of(since: datetime, bucket_s: int) -> datetime:
    """The first bucket start at or after `since`: buckets from it on lie wholly in a range starting at `since`."""
    start = bucket_of(since, bucket_s)
    aware = since if since.tzinfo is not None else since.replace(tzinfo=UTC)
    return start if start == aware else datetime.fromtimestamp(start.timestamp() + bucket_s, UTC)


@dataclass(frozen=True)
class Mark:
    """Every window with an id up to `window_id` is in rollups of `bucket_s`-second buckets."""

    window_id: int
    bucket_s: int


def read_rollups(
    session: Session, *, model: str, version: str, since: datetime, until: datetime | None = None
) -> tuple[Mark | None, list[StoredRollup]]:
    """The mark and the rollups of buckets starting at or after `since` (and, with `until`, before the bucket holding
    `until`: that partial bucket is read raw), read in one statement (one snapshot: a compaction committing
    meanwhile cannot make a window count twice or not at all). (None, []) before the first compaction."""
    r = DriftRollup
    joined = and_(
        col(r.model_name) == model, col(r.model_version) == version, col(r.bucket_start) >= since
    )  # fmt: skip
    m = DriftRollupMark
    columns = [col(c) for c in (m.window_id, m.bucket_s, r.device_id, r.windows, r.inference_count, r.unreadable,
                                r.sketches, r.class_counts, r.labels, r.bucket_start)]  # fmt: skip
    statement = core_select(*columns).select_from(m).outerjoin(r, joined).where(col(m.id) == _MARK_ID)
    mark: Mark | None = None
    rollups = []
    for (
        window_id,
        bucket_s,
        device_id,
        windows,
        inferences,
        unreadable,
        sketches,
        classes,
        labels,
        bucket_start,
    ) in session.connection().execute(statement):
        mark = Mark(int(window_id), int(bucket_s))
        if until is not None and device_id is not None and _utc(bucket_start) >= bucket_of(until, mark.bucket_s):
            continue  # the bucket holding `until` (or a later one): its windows up to `until` are read raw
        if device_id is not None:
            rollups.append(
                StoredRollup(device_id, int(windows), int(inferences), int(unreadable), sketches, classes or {}, labels)
            )
    return mark, rollups


@dataclass(frozen=True)
class Compacted:
    """What compaction did: windows merged, rollup rows written, the mark it left."""

    windows: int
    rollups: int
    mark: int


def _ceiling(engine: Engine) -> int:
    """The highest window id with no lower id still to commit (module docstring, step 1)."""
    with Session(engine) as session:
        if session.get_bind().dialect.name == "postgresql":
            session.connection().execute(text(f"SET LOCAL lock_timeout = '{_LOCK_TIMEOUT}'"))
            session.connection().execute(text("LOCK TABLE telemetry_window IN SHARE MODE"))
        ceiling = session.exec(select(func.max(TelemetryRecord.id))).one()
        session.commit()
    return int(ceiling or 0)


def _mark(engine: Engine, bucket_s: int) -> Mark:
    """The mark, made at the first compaction with `bucket_s` (a later setting does not change it)."""
    with Session(engine) as session:
        insert = pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert
        row = {"id": _MARK_ID, "window_id": 0, "bucket_s": bucket_s, "updated_at": utcnow()}
        table = DriftRollupMark.__table__  # type: ignore[attr-defined]
        session.connection().execute(insert(table).values(**row).on_conflict_do_nothing(index_elements=["id"]))
        session.commit()
        stored = session.exec(select(DriftRollupMark).where(DriftRollupMark.id == _MARK_ID)).one()
        if stored.bucket_s != bucket_s:
            log.warning("drift rollups keep their %d s buckets (setting: %d s)", stored.bucket_s, bucket_s)
        return Mark(int(stored.window_id), int(stored.bucket_s))


_Key = tuple[str, str, datetime, str]  # model, version, bucket start, device


def _merge_windows(
    session: Session, mark: int, ceiling: int, limit: int, bucket_s: int
) -> tuple[dict[_Key, Merged], int, int]:
    """The windows `mark < id <= ceiling` (at most `limit`) merged per bucket; how many, and the new mark."""
    t = TelemetryRecord
    rows = session.connection().execute(
        core_select(*[col(c) for c in (t.id, t.device_id, t.model_name, t.model_version, t.window_end,
                                       t.inference_count, t.class_counts, t.sketches, t.labels)])
        .where(col(t.id) > mark, col(t.id) <= ceiling)
        .order_by(col(t.id))
        .limit(limit)
    ).all()  # fmt: skip
    buckets: dict[_Key, Merged] = {}
    for _id, device_id, name, version, end, inferences, classes, raw, labels in rows:
        if name is None or version is None:
            continue  # no model: no drift to judge
        key = (name, version, bucket_of(end, bucket_s), device_id)
        reason = buckets.setdefault(key, Merged()).add_window(inferences, classes, raw, labels)
        if reason is not None:
            log.warning("drift rollup: window sketches skipped device=%s reason=%s", device_id, reason)
    new_mark = int(rows[-1][0]) if len(rows) == limit else ceiling
    return buckets, len(rows), new_mark


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _store(session: Session, buckets: dict[_Key, Merged]) -> None:
    """Add the merged buckets to the stored rollups (in the caller's transaction, which holds the mark)."""
    r = DriftRollup
    stored: dict[_Key, DriftRollup] = {}
    for name, version in sorted({(k[0], k[1]) for k in buckets}):
        keys = [k for k in buckets if (k[0], k[1]) == (name, version)]
        statement = select(r).where(
            r.model_name == name, r.model_version == version,
            col(r.bucket_start).in_(sorted({k[2] for k in keys})), col(r.device_id).in_(sorted({k[3] for k in keys})),
        )  # fmt: skip
        for row in session.exec(statement):
            stored[(row.model_name, row.model_version, _utc(row.bucket_start), row.device_id)] = row
    for key in sorted(buckets):
        delta, found = buckets[key], stored.get(key)
        if found is None:
            row = DriftRollup(model_name=key[0], model_version=key[1], bucket_start=key[2], device_id=key[3])
            merged = delta
        else:
            row = found
            merged = Merged(row.windows, row.inference_count, row.unreadable, None, Counter(row.class_counts))
            merged.labels.add(row.labels)
            sketches, reason = decode_sketches(row.sketches)
            if reason is not None:  # a stored rollup that does not decode: its windows' sketches are lost, say so
                log.error("drift rollup %s does not decode (%s): its sketches start again", row.id, reason)
                merged.unreadable = merged.windows
            merged.sketches = sketches
            merged.windows += delta.windows
            merged.inferences += delta.inferences
            merged.unreadable += delta.unreadable
            merged.class_counts.update(delta.class_counts)
            merged.labels.merge(delta.labels)
            if delta.sketches is not None and merged.add_sketches(delta.sketches) is not None:
                merged.unreadable += delta.windows - delta.unreadable
        wire = merged.sketches.to_wire() if merged.sketches is not None else None
        row.windows, row.inference_count, row.unreadable = merged.windows, merged.inferences, merged.unreadable
        row.sketches = wire.model_dump(mode="json") if wire is not None else None
        row.class_counts = dict(merged.class_counts)
        row.labels = merged.labels.to_json()
        session.add(row)


def compact_drift_batch(engine: Engine, *, bucket_s: int, limit: int = BATCH) -> Compacted:
    """Merge up to `limit` windows above the mark into their rollups, exactly once (module docstring)."""
    stored = _mark(engine, bucket_s)
    mark, bucket_s = stored.window_id, stored.bucket_s
    ceiling = _ceiling(engine)
    if ceiling == mark:
        return Compacted(0, 0, mark)
    if ceiling < mark:
        # The newest windows were deleted (retention) and SQLite may hand their ids out again: every window left is
        # at or below the ceiling, so merged already; the mark comes down to it.
        buckets: dict[_Key, Merged] = {}
        count, new_mark = 0, ceiling
    else:
        with Session(engine) as session:
            buckets, count, new_mark = _merge_windows(session, mark, ceiling, limit, bucket_s)
    with Session(engine) as session:
        moved = session.connection().execute(
            update(DriftRollupMark)
            .where(col(DriftRollupMark.id) == _MARK_ID, col(DriftRollupMark.window_id) == mark)
            .values(window_id=new_mark, updated_at=utcnow())
        )
        if moved.rowcount != 1:  # another compactor moved the mark first: it merged these windows
            session.rollback()
            return Compacted(0, 0, mark)
        _store(session, buckets)
        session.commit()
    return Compacted(count, len(buckets), new_mark)


def compact_drift(
    engine: Engine,
    *,
    bucket_s: int,
    batch: int = BATCH,
    max_batches: int = 1000,
    rest: Callable[[float], bool] | None = None,
) -> Compacted:
    """Compact every window stored since the mark, `batch` per transaction.

    `rest(seconds)`, called between batches with as long as the last batch took, pauses (and returns True to stop
    early: the rest waits for the next call). In the coordinator, compaction shares the process (the GIL) and, on
    SQLite, the database's one writer with telemetry ingest; back to back, the minute's windows of 10,000 devices
    (~60,000, ~4 s per 10,000 with sketches) starved ingest for seconds at a time.
    """
    windows = rollups = 0
    done = Compacted(0, 0, 0)
    for _ in range(max_batches):
        started = time.monotonic()
        done = compact_drift_batch(engine, bucket_s=bucket_s, limit=batch)
        windows, rollups = windows + done.windows, rollups + done.rollups
        if done.windows < batch:
            break
        if rest is not None and rest(time.monotonic() - started):
            break
    if windows:
        log.info("drift rollups: %d windows merged into %d bucket updates (mark %d)", windows, rollups, done.mark)
    return Compacted(windows, rollups, done.mark)
