"""Devices as their reports describe them, their events and their telemetry windows."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, BigInteger, Column, Index, UniqueConstraint
from sqlmodel import Field, SQLModel, col

from cloud.models._common import UtcOut, json_column, when
from cloud.models.identity import DeviceCertificatePublic
from cloud.models.telemetry import TelemetryGapsPublic

__all__ = [
    "Device",
    "DeviceBase",
    "DeviceDetailPublic",
    "DeviceEventPublic",
    "DeviceEventRecord",
    "DeviceEventsPublic",
    "DevicePublic",
    "DevicesPublic",
    "EnrolmentState",
    "TelemetryRecord",
    "TelemetryWindowPublic",
    "TelemetryWindowsPublic",
    "in_fleet",
]


class DeviceBase(SQLModel):
    """A device as its reports describe it."""

    tags: dict[str, str] = json_column(dict)
    status: str = Field(default="offline", max_length=16)
    agent_version: str | None = Field(default=None, max_length=64)
    inference_url: str | None = Field(default=None, max_length=2048)
    capabilities: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    active_model_name: str | None = Field(default=None, max_length=128)
    active_model_version: str | None = Field(default=None, max_length=64)
    active_model_sha256: str | None = Field(default=None, max_length=64)
    desired_generation: int = Field(default=0, sa_type=BigInteger)
    reported_generation: int | None = Field(default=None, sa_type=BigInteger)
    update_phase: str | None = Field(default=None, max_length=32)
    last_error_code: str | None = Field(default=None, max_length=64)
    last_error_message: str | None = None
    # Why the coordinator distrusts what the device reports (e.g. a generation it never issued); None when fine.
    anomaly: str | None = Field(default=None, max_length=512)


class EnrolmentState(StrEnum):
    """Where a device stands with the fleet: only `enrolled` devices may speak on the broker."""

    PENDING = "pending"  # an operator created an enrolment token; the device has no certificate yet
    ENROLLED = "enrolled"
    REVOKED = "revoked"
    # Retired for good: certificates revoked, out of deployments, rollouts and fleet counts; its history is kept.
    DECOMMISSIONED = "decommissioned"


class Device(DeviceBase, table=True):
    """A device the fleet enrolled; `desired_state` is what the bridge (re)publishes."""

    id: str = Field(primary_key=True, max_length=128)
    enrolment: str = Field(default=EnrolmentState.PENDING.value, max_length=16, index=True)
    enrolled_at: datetime | None = when(nullable=True)
    revoked_at: datetime | None = when(nullable=True)
    decommissioned_at: datetime | None = when(nullable=True)
    desired_state: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    first_seen: datetime = when()
    last_seen: datetime | None = when(nullable=True)
    last_reported_at: datetime | None = when(nullable=True)


class DevicePublic(DeviceBase, UtcOut):
    """A device with its reported state and telemetry totals."""

    id: str
    enrolment: str = EnrolmentState.PENDING.value
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None
    decommissioned_at: datetime | None = None
    first_seen: datetime
    last_seen: datetime | None
    # The active model again, under the names the fleet summary uses.
    model_name: str | None = None
    model_version: str | None = None
    inference_count: int = 0
    error_count: int = 0
    telemetry_windows: int = 0
    # Windows the device dropped for good (its outbox was full), and holes in its chain of windows.
    telemetry_dropped: int = 0
    telemetry_gaps: TelemetryGapsPublic = Field(default_factory=TelemetryGapsPublic)


def in_fleet() -> Any:
    """The SQL condition of a device that counts in the fleet: every device but a decommissioned one."""
    return col(Device.enrolment) != EnrolmentState.DECOMMISSIONED.value


class DeviceDetailPublic(DevicePublic):
    """One device in full: what a listing shows, the variant of its active model, and its current certificate."""

    active_variant: str | None = None
    certificate: DeviceCertificatePublic | None = None


class TelemetryWindowPublic(UtcOut):
    """One stored telemetry window."""

    seq: int
    window_start: datetime
    window_end: datetime
    model_name: str | None
    model_version: str | None
    inference_count: int
    error_count: int
    latency_histogram: list[int]
    class_counts: dict[str, int]
    received_at: datetime


class TelemetryWindowsPublic(SQLModel):
    """A device's stored telemetry windows, by seq."""

    data: list[TelemetryWindowPublic]
    count: int


class DevicesPublic(SQLModel):
    """A listing of devices."""

    data: list[DevicePublic]
    count: int


class DeviceEventRecord(SQLModel, table=True):
    """A `protocol.DeviceEvent` as received."""

    __tablename__ = "device_event"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    kind: str = Field(max_length=32)
    generation: int | None = Field(default=None, sa_type=BigInteger)
    phase: str | None = Field(default=None, max_length=32)
    message: str = ""
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = None
    at: datetime = when()
    received_at: datetime = when()


class DeviceEventPublic(UtcOut):
    """A device event as the API shows it; `id` orders events and pages through them (`after_id`)."""

    id: int
    kind: str
    generation: int | None
    phase: str | None
    message: str
    error_code: str | None
    error_message: str | None
    at: datetime
    received_at: datetime


class DeviceEventsPublic(SQLModel):
    """A device's events, oldest first."""

    data: list[DeviceEventPublic]
    count: int


class TelemetryRecord(SQLModel, table=True):
    """One `protocol.TelemetryWindow`, stored once per `(device_id, seq)`."""

    __tablename__ = "telemetry_window"
    __table_args__ = (
        UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),
        # Drift and alert queries read a version's windows of a time range; retention deletes by arrival.
        Index("ix_telemetry_window_model_end", "model_name", "model_version", "window_end"),
        Index("ix_telemetry_window_received_at", "received_at"),
    )

    id: int | None = Field(default=None, primary_key=True)
    # Not indexed alone: the unique (device_id, seq) index serves every lookup by device (migration 0013).
    device_id: str = Field(foreign_key="device.id", max_length=128)
    seq: int = Field(sa_type=BigInteger)
    # The window the device produced before this one (`TelemetryWindow.prev_seq`); null: none known.
    prev_seq: int | None = Field(default=None, sa_type=BigInteger)
    window_start: datetime = when()
    window_end: datetime = when()
    model_name: str | None = Field(default=None, max_length=128)
    model_version: str | None = Field(default=None, max_length=64)
    model_sha256: str | None = Field(default=None, max_length=64)
    inference_count: int
    error_count: int
    latency_histogram: list[int] = json_column(list)
    class_counts: dict[str, int] = json_column(dict)
    # The window's mergeable sketches (`protocol.sketches.WindowSketches`), null when the device sent none.
    sketches: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    received_at: datetime = when()
    # The labels local applications fed back in the window (`protocol.messages.LabelCounts`), null when none.
    labels: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
