"""Registry tables and their API shapes, as SQLModel families (`XBase → X(table=True) → XPublic`).

The same definitions run on SQLite and PostgreSQL: JSON columns use the portable `JSON` type and
timestamps are stored timezone-aware (SQLite hands them back naive; `as_utc` restores the zone).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import field_validator
from sqlalchemy import JSON, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel

from protocol.messages import utcnow

__all__ = [
    "Deployment",
    "DeploymentPublic",
    "DeploymentTarget",
    "DeploymentTargetPublic",
    "DeploymentsPublic",
    "Device",
    "DeviceEventRecord",
    "DevicePublic",
    "DevicesPublic",
    "Model",
    "ModelPublic",
    "ModelVersion",
    "ModelVersionPublic",
    "ModelsPublic",
    "TargetStatus",
    "TelemetryRecord",
    "TelemetryWindowPublic",
    "TelemetryWindowsPublic",
    "as_utc",
]


def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp read back from the database, with its UTC zone restored where SQLite dropped it."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _json(default: Any) -> Any:
    return Field(default_factory=default, sa_column=Column(JSON, nullable=False))


def _when(*, nullable: bool = False) -> Any:
    """A timezone-aware timestamp column (defaulting to now unless nullable)."""
    column = Column(DateTime(timezone=True), nullable=nullable)
    return Field(default=None, sa_column=column) if nullable else Field(default_factory=utcnow, sa_column=column)


class _UtcOut(SQLModel):
    """Public shapes: timestamps always carry their zone."""

    @field_validator("*", mode="after")
    @classmethod
    def _zone(cls, value: Any) -> Any:
        return as_utc(value) if isinstance(value, datetime) else value


# -- models and versions -----------------------------------------------------------------------


class Model(SQLModel, table=True):
    """A named model; its versions hold the artifacts."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    created_at: datetime = _when()


class ModelVersionBase(SQLModel):
    """What identifies and describes one uploaded version."""

    name: str = Field(index=True, max_length=128)
    version: str = Field(max_length=64)
    sha256: str = Field(index=True, max_length=64)
    size: int
    format: str = Field(max_length=16)


class ModelVersion(ModelVersionBase, table=True):
    """One immutable model version; `inputs`/`outputs` are `protocol.TensorSpec` lists as JSON."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_version_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    inputs: list[dict[str, Any]] = _json(list)
    outputs: list[dict[str, Any]] = _json(list)
    created_at: datetime = _when()


class ModelVersionPublic(ModelVersionBase, _UtcOut):
    """A model version as the API shows it, with the URL its artifact is served from."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    created_at: datetime
    artifact_url: str = ""


class ModelPublic(_UtcOut):
    """A model with its versions, newest last."""

    name: str
    created_at: datetime
    versions: list[ModelVersionPublic]


class ModelsPublic(SQLModel):
    """A listing of models."""

    data: list[ModelPublic]
    count: int


# -- devices ------------------------------------------------------------------------------------


class DeviceBase(SQLModel):
    """A device as its reports describe it."""

    tags: dict[str, str] = _json(dict)
    status: str = Field(default="offline", max_length=16)
    agent_version: str | None = Field(default=None, max_length=64)
    inference_url: str | None = Field(default=None, max_length=2048)
    capabilities: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    active_model_name: str | None = Field(default=None, max_length=128)
    active_model_version: str | None = Field(default=None, max_length=64)
    active_model_sha256: str | None = Field(default=None, max_length=64)
    desired_generation: int = 0
    reported_generation: int | None = None
    update_phase: str | None = Field(default=None, max_length=32)
    last_error_code: str | None = Field(default=None, max_length=64)
    last_error_message: str | None = None


class Device(DeviceBase, table=True):
    """A device, enrolled on its first message; `desired_state` is what the bridge (re)publishes."""

    id: str = Field(primary_key=True, max_length=128)
    desired_state: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    first_seen: datetime = _when()
    last_seen: datetime | None = _when(nullable=True)
    last_reported_at: datetime | None = _when(nullable=True)


class DevicePublic(DeviceBase, _UtcOut):
    """A device with its reported state and telemetry totals."""

    id: str
    first_seen: datetime
    last_seen: datetime | None
    # The active model again, under the names the fleet summary uses.
    model_name: str | None = None
    model_version: str | None = None
    inference_count: int = 0
    error_count: int = 0
    telemetry_windows: int = 0


class TelemetryWindowPublic(_UtcOut):
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
    generation: int | None = None
    phase: str | None = Field(default=None, max_length=32)
    message: str = ""
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = None
    at: datetime = _when()
    received_at: datetime = _when()


class TelemetryRecord(SQLModel, table=True):
    """One `protocol.TelemetryWindow`, stored once per `(device_id, seq)`."""

    __tablename__ = "telemetry_window"
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    seq: int
    window_start: datetime = _when()
    window_end: datetime = _when()
    model_name: str | None = Field(default=None, max_length=128)
    model_version: str | None = Field(default=None, max_length=64)
    model_sha256: str | None = Field(default=None, max_length=64)
    inference_count: int
    error_count: int
    latency_histogram: list[int] = _json(list)
    class_counts: dict[str, int] = _json(dict)
    received_at: datetime = _when()


# -- deployments --------------------------------------------------------------------------------


class TargetStatus(StrEnum):
    """Progress of one device within a deployment, following its reported state."""

    PENDING = "pending"
    IN_PROGRESS = "in_progress"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    # A later deployment gave the device a newer generation before this one finished.
    SUPERSEDED = "superseded"


class DeploymentBase(SQLModel):
    """Which model version goes where."""

    model_name: str = Field(max_length=128)
    model_version: str = Field(max_length=64)
    sha256: str = Field(max_length=64)
    target: dict[str, Any] = _json(dict)


class Deployment(DeploymentBase, table=True):
    """One deployment request."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = _when()


class DeploymentTargetBase(SQLModel):
    """One device's part in a deployment."""

    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    generation: int
    status: str = Field(default=TargetStatus.PENDING.value, max_length=16)
    phase: str | None = Field(default=None, max_length=32)
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = None


class DeploymentTarget(DeploymentTargetBase, table=True):
    """A device targeted by a deployment, with the generation it was given."""

    __tablename__ = "deployment_target"
    __table_args__ = (UniqueConstraint("deployment_id", "device_id", name="uq_target_deployment_device"),)

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: int = Field(foreign_key="deployment.id", index=True)
    updated_at: datetime = _when()


class DeploymentTargetPublic(DeploymentTargetBase, _UtcOut):
    """A target as the API shows it."""

    updated_at: datetime


class DeploymentPublic(DeploymentBase, _UtcOut):
    """A deployment with per-device progress; `status` summarises the targets."""

    id: int
    created_at: datetime
    status: str
    counts: dict[str, int]
    targets: list[DeploymentTargetPublic]


class DeploymentsPublic(SQLModel):
    """A listing of deployments."""

    data: list[DeploymentPublic]
    count: int
