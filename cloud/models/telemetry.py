"""What the coordinator knows of each device's chain of telemetry windows: where it is settled, what is missing.

`TelemetryChain` holds, per device, the seq up to which its chain is settled (`TelemetryAck.stored_seq`) and
the windows the device says it dropped; `TelemetryGap` a hole in the chain: pending while its grace period
runs (`reported_at` null, at most one per device), reported once it is over, shrunk when late windows fill it.
`TelemetryRollup` holds per device, model version and time bucket the sums of its stored windows; raw windows
are deleted after a retention period, rollups kept much longer (`cloud.telemetry.retention`).
`DriftRollup` holds per device, model version and time bucket (by window end) the merged sketches, class counts and
label sums of its windows, `DriftRollupMark` up to which window id they are merged (`cloud.drift.rollups`).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.models._common import json_column, when

__all__ = ["DriftRollup", "DriftRollupMark", "TelemetryChain", "TelemetryGap", "TelemetryGapsPublic", "TelemetryRollup"]


class TelemetryChain(SQLModel, table=True):
    """One device's settled telemetry chain and the windows it dropped."""

    __tablename__ = "telemetry_chain"

    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=128)
    # Every window of the device up to this seq is stored, in a reported gap, or skipped by a declared jump.
    settled_seq: int | None = Field(default=None, sa_type=BigInteger)
    # The highest `TelemetryWindow.dropped_windows` the device sent: windows it dropped for good.
    dropped_windows: int = Field(default=0, sa_type=BigInteger)
    # The highest seq whose window retention deleted (all at or below `settled_seq`): a window at or below it
    # that is not in a reported gap was stored once already, and the acknowledgement's `max_seq` never drops.
    pruned_seq: int | None = Field(default=None, sa_type=BigInteger)


class TelemetryGap(SQLModel, table=True):
    """Seqs `first_seq..last_seq` of a device that never arrived: pending, then reported."""

    __tablename__ = "telemetry_gap"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    first_seq: int = Field(sa_type=BigInteger)
    last_seq: int = Field(sa_type=BigInteger)
    detected_at: datetime = when()
    reported_at: datetime | None = when(nullable=True)


class TelemetryGapsPublic(SQLModel):
    """A device's reported telemetry gaps: how many, how many windows in all, and the newest ranges."""

    count: int = 0
    windows: int = 0
    ranges: list[tuple[int, int]] = Field(default_factory=list)


class TelemetryRollup(SQLModel, table=True):
    """Sums of one device's stored windows of one model version whose `window_start` falls in one time bucket.

    Counts are added; each JSON column is merged by its function in `cloud.telemetry.rollups.MERGED` (a new
    per-window field, e.g. a sketch, is one more JSON column and one more entry there). No model: empty names.
    """

    __tablename__ = "telemetry_rollup"
    __table_args__ = (
        UniqueConstraint("device_id", "model_name", "model_version", "bucket_start", name="uq_telemetry_rollup_bucket"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=128)
    model_name: str = Field(default="", max_length=128)
    model_version: str = Field(default="", max_length=64)
    bucket_start: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    windows: int = Field(default=0, sa_type=BigInteger)
    inference_count: int = Field(default=0, sa_type=BigInteger)
    error_count: int = Field(default=0, sa_type=BigInteger)
    latency_histogram: list[int] = json_column(list)
    class_counts: dict[str, int] = json_column(dict)


class DriftRollup(SQLModel, table=True):
    """The merged drift data of one device's windows of one model version whose `window_end` falls in one bucket.

    Filled by compaction (`cloud.drift.rollups.compact_drift`), never by ingest; read by drift queries for the
    whole buckets of their range.
    """

    __tablename__ = "drift_rollup"
    __table_args__ = (
        UniqueConstraint("model_name", "model_version", "bucket_start", "device_id", name="uq_drift_rollup_bucket"),
    )

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", max_length=128)
    model_name: str = Field(max_length=128)
    model_version: str = Field(max_length=64)
    bucket_start: datetime = Field(sa_column=Column(DateTime(timezone=True), nullable=False, index=True))
    windows: int = Field(default=0, sa_type=BigInteger)
    inference_count: int = Field(default=0, sa_type=BigInteger)
    # Windows whose sketches did not decode or did not merge with the bucket's (counted, not merged).
    unreadable: int = Field(default=0, sa_type=BigInteger)
    # The merged sketches (`protocol.sketches.WindowSketches`: rows, layout, KLL sketches), null when none.
    sketches: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    class_counts: dict[str, int] = json_column(dict)
    # Sums of the windows' `protocol.messages.LabelCounts`, null when none carried labels.
    labels: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))


class DriftRollupMark(SQLModel, table=True):
    """One row: every telemetry window with an id up to `window_id` is merged into the drift rollups, whose buckets
    are `bucket_s` long (fixed when compaction first runs: one length makes the partial bucket of a range exact)."""

    __tablename__ = "drift_rollup_mark"

    id: int = Field(default=1, primary_key=True)
    window_id: int = Field(default=0, sa_type=BigInteger)
    bucket_s: int
    updated_at: datetime = when()
