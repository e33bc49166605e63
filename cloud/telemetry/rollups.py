"""Rollups: per device, model version and time bucket, the sums of its stored telemetry windows.

`rollup_deltas` (pure) sums a batch of new windows per `RollupKey`; `apply_rollups` adds them to the stored rows
in the caller's transaction: missing rows are inserted empty (`ON CONFLICT DO NOTHING`), then every row of the
batch is locked (`FOR UPDATE` on PostgreSQL; SQLite has one writer at a time), merged in Python and written
back, so concurrent batches never lose an increment. Counts are added; each JSON column is merged by its
function in `MERGED` — a new per-window field (a sketch) is a column on `TelemetryRollup`, a reader of the
window in `_window_values` and an entry here. Readers of time ranges (`rollup_series`, `rollup_totals`, the
fleet summary) read rollups, which outlive the raw windows (`cloud.telemetry.retention`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, tuple_, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlmodel import Session, col, select

from cloud.models.telemetry import TelemetryRollup
from protocol.messages import TelemetryWindow

__all__ = [
    "DEFAULT_BUCKET_S",
    "MERGED",
    "RollupDelta",
    "RollupKey",
    "apply_rollups",
    "bucket_of",
    "merge_counts",
    "merge_histogram",
    "rollup_deltas",
    "rollup_series",
    "rollup_totals",
]

DEFAULT_BUCKET_S = 60


def merge_histogram(a: Sequence[int], b: Sequence[int]) -> list[int]:
    """Element-wise sum of two latency histograms (the shorter one padded with zeros). Pure."""
    longer, shorter = (a, b) if len(a) >= len(b) else (b, a)
    return [x + (shorter[i] if i < len(shorter) else 0) for i, x in enumerate(longer)]


def merge_counts(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    """Per-key sum of two count maps (class counts). Pure."""
    merged = dict(a)
    for key, value in b.items():
        merged[key] = merged.get(key, 0) + value
    return merged


# JSON column → how two values merge (associative, with the column's empty value as identity).
MERGED: dict[str, Callable[[Any, Any], Any]] = {
    "latency_histogram": merge_histogram,
    "class_counts": merge_counts,
}
_EMPTY: dict[str, Callable[[], Any]] = {"latency_histogram": list, "class_counts": dict}
_ADDED = ("windows", "inference_count", "error_count")


@dataclass(frozen=True, order=True)
class RollupKey:
    """Which rollup row a window adds to."""

    device_id: str
    model_name: str
    model_version: str
    bucket_start: datetime


@dataclass
class RollupDelta:
    """What a batch adds to one rollup row."""

    windows: int = 0
    inference_count: int = 0
    error_count: int = 0
    merged: dict[str, Any] = field(default_factory=lambda: {name: empty() for name, empty in _EMPTY.items()})

    def add(self, other: RollupDelta) -> None:
        """Add `other` to this delta."""
        self.windows += other.windows
        self.inference_count += other.inference_count
        self.error_count += other.error_count
        for name, merge in MERGED.items():
            self.merged[name] = merge(self.merged[name], other.merged[name])


def bucket_of(when: datetime, bucket_s: int) -> datetime:
    """The start of the `bucket_s`-second bucket holding `when` (UTC; buckets aligned on the epoch). Pure."""
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    seconds = int(aware.timestamp())
    return datetime.fromtimestamp(seconds - seconds % bucket_s, UTC)


def _window_values(window: TelemetryWindow) -> RollupDelta:
    return RollupDelta(
        windows=1,
        inference_count=window.inference_count,
        error_count=window.error_count,
        merged={"latency_histogram": list(window.latency_histogram), "class_counts": dict(window.class_counts)},
    )


def rollup_deltas(windows: Iterable[TelemetryWindow], bucket_s: int) -> dict[RollupKey, RollupDelta]:
    """Sum `windows` (each stored for the first time) per rollup row. Pure."""
    deltas: dict[RollupKey, RollupDelta] = {}
    for window in windows:
        model = window.model
        key = RollupKey(
            window.device_id,
            model.name if model else "",
            model.version if model else "",
            bucket_of(window.window_start, bucket_s),
        )
        deltas.setdefault(key, RollupDelta()).add(_window_values(window))
    return deltas


def _insert(session: Session) -> Any:
    return pg_insert if session.get_bind().dialect.name == "postgresql" else sqlite_insert


def apply_rollups(session: Session, deltas: dict[RollupKey, RollupDelta]) -> None:
    """Add `deltas` to the stored rollups in the caller's transaction (not committed)."""
    if not deltas:
        return
    keys = sorted(deltas)  # one lock order for every batch: concurrent batches do not deadlock
    table = TelemetryRollup.__table__  # type: ignore[attr-defined]
    empty = {name: make() for name, make in _EMPTY.items()}
    rows = [
        {
            "device_id": k.device_id,
            "model_name": k.model_name,
            "model_version": k.model_version,
            "bucket_start": k.bucket_start,
            "windows": 0,
            "inference_count": 0,
            "error_count": 0,
            **empty,
        }
        for k in keys
    ]
    conflict = ["device_id", "model_name", "model_version", "bucket_start"]
    connection = session.connection()
    connection.execute(_insert(session)(table).on_conflict_do_nothing(index_elements=conflict), rows)
    columns = [table.c.device_id, table.c.model_name, table.c.model_version, table.c.bucket_start]
    wanted = [(k.device_id, k.model_name, k.model_version, k.bucket_start) for k in keys]
    statement = (
        table.select()
        .where(tuple_(*columns).in_(wanted))
        .order_by(*columns)
        .with_for_update()  # PostgreSQL: concurrent batches on these rows wait; SQLite ignores it
    )
    stored = {
        RollupKey(r.device_id, r.model_name, r.model_version, _utc(r.bucket_start)): r
        for r in connection.execute(statement)
    }
    updates = []
    for key in keys:
        row, delta = stored[key], deltas[key]
        values: dict[str, Any] = {"_id": row.id}
        for name in _ADDED:
            values[name] = getattr(row, name) + getattr(delta, name)
        for name, merge in MERGED.items():
            values[name] = merge(getattr(row, name) or _EMPTY[name](), delta.merged[name])
        updates.append(values)
    assignments: dict[str, Any] = {name: bindparam(name) for name in (*_ADDED, *MERGED)}
    connection.execute(update(table).where(table.c.id == bindparam("_id")).values(**assignments), updates)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def rollup_series(
    session: Session,
    *,
    device_ids: Sequence[str] | None,
    model: str | None,
    since: datetime | None = None,
    until: datetime | None = None,
    version: str | None = None,
) -> list[TelemetryRollup]:
    """Rollup rows of `device_ids` (None: every device) for `model` (None: any), buckets in [since, until),
    ordered by bucket, device and version. The JSON columns hold each row's merged values."""
    statement = select(TelemetryRollup)
    if device_ids is not None:
        statement = statement.where(col(TelemetryRollup.device_id).in_(list(device_ids)))
    if model is not None:
        statement = statement.where(TelemetryRollup.model_name == model)
    if version is not None:
        statement = statement.where(TelemetryRollup.model_version == version)
    if since is not None:
        statement = statement.where(col(TelemetryRollup.bucket_start) >= since)
    if until is not None:
        statement = statement.where(col(TelemetryRollup.bucket_start) < until)
    order = (col(TelemetryRollup.bucket_start), col(TelemetryRollup.device_id), col(TelemetryRollup.model_version))
    rows = list(session.exec(statement.order_by(*order)))
    for row in rows:
        row.bucket_start = _utc(row.bucket_start)
    return rows


def rollup_totals(session: Session, device_ids: Sequence[str] | None = None) -> dict[str, tuple[int, int, int]]:
    """device id → (inference count, error count, windows) over every kept rollup."""
    statement = select(
        TelemetryRollup.device_id,
        func.coalesce(func.sum(TelemetryRollup.inference_count), 0),
        func.coalesce(func.sum(TelemetryRollup.error_count), 0),
        func.coalesce(func.sum(TelemetryRollup.windows), 0),
    ).group_by(TelemetryRollup.device_id)
    if device_ids is not None:
        statement = statement.where(col(TelemetryRollup.device_id).in_(list(device_ids)))
    return {row[0]: (int(row[1]), int(row[2]), int(row[3])) for row in session.exec(statement)}
