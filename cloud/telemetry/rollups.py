"""Rollups: per device, model version and time bucket, the sums of its stored telemetry windows.

`rollup_deltas` (pure) sums a batch of new windows per `RollupKey`; `apply_rollups` adds them to the stored rows
in the caller's transaction with two statements whatever the batch: one upsert adds the counts (inserting missing
rows) and returns each row's JSON columns, which are merged in Python and written back by the second. The upsert
leaves every row of the batch written by this transaction (PostgreSQL: locked until the commit; SQLite has one
writer at a time), so concurrent batches never lose an increment. Counts are added; each JSON column is merged by its
function in `MERGED` — a new per-window field (a sketch) is a column on `TelemetryRollup`, a reader of the
window in `_window_values` and an entry here. Readers of time ranges (`rollup_series`, `rollup_totals`, the
fleet summary) read rollups, which outlive the raw windows (`cloud.telemetry.retention`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import cache
from typing import Any

from sqlalchemy import func, text
from sqlmodel import Session, col, select

from cloud.models.telemetry import TelemetryRollup
from cloud.telemetry._json_rows import columns_of, rows_json, rows_select
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
    return datetime.fromtimestamp(_bucket_seconds(when, bucket_s), UTC)


def _bucket_seconds(when: datetime, bucket_s: int) -> int:
    aware = when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    seconds = int(aware.timestamp())
    return seconds - seconds % bucket_s


def _window_values(window: TelemetryWindow) -> dict[str, Any]:
    """The window's value of each column in `MERGED` (read, not copied: merging builds new values)."""
    return {"latency_histogram": window.latency_histogram, "class_counts": window.class_counts}


def rollup_deltas(windows: Iterable[TelemetryWindow], bucket_s: int) -> dict[RollupKey, RollupDelta]:
    """Sum `windows` (each stored for the first time) per rollup row. Pure."""
    # Grouped by a plain tuple first; a `RollupKey`, a bucket datetime and a delta are built once a row, not once a
    # window (several windows of a device share a bucket): 3.5 -> 2.9 µs a window in batches of 500.
    groups: dict[tuple[str, str, str, int], list[TelemetryWindow]] = {}
    for window in windows:
        model = window.model
        group = (
            window.device_id,
            model.name if model else "",
            model.version if model else "",
            _bucket_seconds(window.window_start, bucket_s),
        )
        members = groups.get(group)
        if members is None:
            groups[group] = [window]
        else:
            members.append(window)
    deltas: dict[RollupKey, RollupDelta] = {}
    for (device_id, name, version, seconds), members in groups.items():
        delta = RollupDelta(len(members), sum(w.inference_count for w in members), sum(w.error_count for w in members))
        merged = delta.merged
        for window in members:
            for column, value in _window_values(window).items():
                merged[column] = MERGED[column](merged[column], value)
        deltas[RollupKey(device_id, name, version, datetime.fromtimestamp(seconds, UTC))] = delta
    return deltas


_KEY = ("device_id", "model_name", "model_version", "bucket_start")


@cache
def _statements(dialect: str) -> tuple[Any, Any]:
    """(add the counts, inserting missing rows, and return the JSON columns to merge; write the merged JSON back):
    one JSON parameter each (`cloud.telemetry._json_rows`), whatever the number of rows."""
    table = TelemetryRollup.__table__  # type: ignore[attr-defined]
    inserted = columns_of(table, (*_KEY, *_ADDED, *MERGED))
    added = ", ".join(f"{name} = telemetry_rollup.{name} + excluded.{name}" for name in _ADDED)
    returned = [table.c[name] for name in ("id", *_KEY, *MERGED)]
    upsert = text(
        f"INSERT INTO telemetry_rollup ({', '.join(name for name, _ in inserted)}) {rows_select(dialect, inserted)} "
        f"ON CONFLICT ({', '.join(_KEY)}) DO UPDATE SET {added} RETURNING {', '.join(c.name for c in returned)}"
    ).columns(*returned)  # typed: timestamps and JSON read back as SQLAlchemy reads them
    merged = columns_of(table, ("id", *MERGED))
    assignments = ", ".join(f"{name} = r.{name}" for name, _ in merged[1:])
    update = text(
        f"UPDATE telemetry_rollup SET {assignments} FROM ({rows_select(dialect, merged)}) AS r "
        "WHERE telemetry_rollup.id = r.id"
    )
    return upsert, update


def apply_rollups(session: Session, deltas: dict[RollupKey, RollupDelta]) -> None:
    """Add `deltas` to the stored rollups in the caller's transaction (not committed)."""
    if not deltas:
        return
    keys = sorted(deltas)  # one lock order for every batch: concurrent batches do not deadlock
    table = TelemetryRollup.__table__  # type: ignore[attr-defined]
    connection = session.connection()
    dialect = connection.dialect
    upsert, update = _statements(dialect.name)
    empty = {name: make() for name, make in _EMPTY.items()}
    rows = [
        {
            "device_id": k.device_id,
            "model_name": k.model_name,
            "model_version": k.model_version,
            "bucket_start": k.bucket_start,
            **{name: getattr(deltas[k], name) for name in _ADDED},
            **empty,  # merged below, with the row's stored values
        }
        for k in keys
    ]
    # The counts are added in SQL; each row is now written by this transaction (PostgreSQL: locked until the commit,
    # so a concurrent batch waits to merge the JSON columns after this one; SQLite has one writer at a time).
    stored = connection.execute(upsert, {"rows": rows_json(dialect, table, columns_of(table, rows[0]), rows)})
    merged = []
    for row in stored:
        delta = deltas[RollupKey(row.device_id, row.model_name, row.model_version, _utc(row.bucket_start))]
        values: dict[str, Any] = {"id": row.id}
        for name, merge in MERGED.items():
            values[name] = merge(getattr(row, name) or _EMPTY[name](), delta.merged[name])
        merged.append(values)
    connection.execute(update, {"rows": rows_json(dialect, table, columns_of(table, merged[0]), merged)})


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
