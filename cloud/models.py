"""Registry tables and their API shapes, as SQLModel families (`XBase → X(table=True) → XPublic`).

The same definitions run on SQLite and PostgreSQL: JSON columns use the portable `JSON` type and
timestamps are stored timezone-aware (SQLite hands them back naive; `as_utc` restores the zone).
"""

from __future__ import annotations

from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from pydantic import field_validator
from sqlalchemy import JSON, BigInteger, Column, DateTime, UniqueConstraint
from sqlmodel import Field, SQLModel

from protocol.messages import utcnow

__all__ = [
    "ApiToken",
    "ApiTokenPublic",
    "BootstrapSecret",
    "Deployment",
    "DeploymentPublic",
    "DeploymentTarget",
    "DeploymentTargetPublic",
    "DeploymentsPublic",
    "Device",
    "DeviceCertificate",
    "DeviceEventPublic",
    "DeviceEventRecord",
    "DeviceEventsPublic",
    "DevicePublic",
    "DevicesPublic",
    "EnrolmentState",
    "EnrolmentToken",
    "Model",
    "ModelPublic",
    "ModelVersion",
    "ModelVersionPublic",
    "ModelsPublic",
    "Rollout",
    "RolloutCommandRecord",
    "RolloutDecisionPublic",
    "RolloutDecisionRecord",
    "RolloutDetailPublic",
    "RolloutDevicePublic",
    "RolloutDispatchRecord",
    "RolloutPublic",
    "RolloutWavePublic",
    "RolloutsPublic",
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
    # Further artifacts of the same version (quantized ONNX, TFLite, ...): `cloud.variant_policy.Variant`
    # dumps. The version's own artifact above is its primary variant, named by `primary_variant`.
    variants: list[dict[str, Any]] = _json(list)
    primary_variant: str = Field(default="default", max_length=64)
    created_at: datetime = _when()


class ModelVersionPublic(ModelVersionBase, _UtcOut):
    """A model version as the API shows it, with the URL its artifact is served from."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    created_at: datetime
    artifact_url: str = ""
    primary_variant: str = "default"
    variants: list[dict[str, Any]] = []


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


class Device(DeviceBase, table=True):
    """A device the fleet enrolled; `desired_state` is what the bridge (re)publishes."""

    id: str = Field(primary_key=True, max_length=128)
    enrolment: str = Field(default=EnrolmentState.PENDING.value, max_length=16, index=True)
    enrolled_at: datetime | None = _when(nullable=True)
    revoked_at: datetime | None = _when(nullable=True)
    desired_state: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    first_seen: datetime = _when()
    last_seen: datetime | None = _when(nullable=True)
    last_reported_at: datetime | None = _when(nullable=True)


class DevicePublic(DeviceBase, _UtcOut):
    """A device with its reported state and telemetry totals."""

    id: str
    enrolment: str = EnrolmentState.PENDING.value
    enrolled_at: datetime | None = None
    revoked_at: datetime | None = None
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
    generation: int | None = Field(default=None, sa_type=BigInteger)
    phase: str | None = Field(default=None, max_length=32)
    message: str = ""
    error_code: str | None = Field(default=None, max_length=64)
    error_message: str | None = None
    at: datetime = _when()
    received_at: datetime = _when()


class DeviceEventPublic(_UtcOut):
    """A device event as the API shows it."""

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
    __table_args__ = (UniqueConstraint("device_id", "seq", name="uq_telemetry_device_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    seq: int = Field(sa_type=BigInteger)
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
    generation: int = Field(sa_type=BigInteger)
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


# -- rollouts -----------------------------------------------------------------------------------


class RolloutBase(SQLModel):
    """Which model version a rollout takes to the fleet, and where it stands."""

    model_name: str = Field(index=True, max_length=128)
    model_version: str = Field(max_length=64)
    status: str = Field(default="pending", index=True, max_length=16)


class Rollout(RolloutBase, table=True):
    """A quality-gated rollout: its plan and the engine's state (`cloud.rollouts`), both as JSON."""

    id: int | None = Field(default=None, primary_key=True)
    plan: dict[str, Any] = _json(dict)
    state: dict[str, Any] = _json(dict)
    format_version: int = 1  # of `state` (`cloud.rollouts.state.FORMAT_VERSION`)
    next_step_at: datetime | None = _when(nullable=True)  # the engine's last `Wait`
    created_at: datetime = _when()
    updated_at: datetime = _when()


class RolloutDecisionRecord(SQLModel, table=True):
    """One decision of a rollout's engine (`cloud.rollouts.Decision`), numbered from 1 per rollout."""

    __tablename__ = "rollout_decision"
    __table_args__ = (UniqueConstraint("rollout_id", "seq", name="uq_rollout_decision_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    seq: int
    kind: str = Field(max_length=32)
    message: str = ""
    figures: dict[str, Any] = _json(dict)
    at: datetime = _when()


class RolloutCommandRecord(SQLModel, table=True):
    """An operator command (pause, resume, abort, promote) kept until the engine has applied it."""

    __tablename__ = "rollout_command"

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    command_id: str = Field(unique=True, max_length=64)
    kind: str = Field(max_length=16)
    body: dict[str, Any] = _json(dict)
    created_at: datetime = _when()
    applied_at: datetime | None = _when(nullable=True)


class RolloutDispatchRecord(SQLModel, table=True):
    """The desired generation one attempt of a rollout gave a device: each attempt raises it exactly once."""

    __tablename__ = "rollout_dispatch"
    __table_args__ = (
        UniqueConstraint("rollout_id", "device_id", "kind", "attempt", name="uq_rollout_dispatch_attempt"),
    )

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    kind: str = Field(max_length=16)  # dispatch | rollback
    attempt: int
    generation: int = Field(sa_type=BigInteger)
    deployment_id: int = Field(foreign_key="deployment.id")
    created_at: datetime = _when()


class RolloutDecisionPublic(_UtcOut):
    """A decision as the API shows it; `figures` holds its data (e.g. a gate report)."""

    seq: int
    kind: str
    message: str
    figures: dict[str, Any]
    at: datetime


class RolloutWavePublic(SQLModel):
    """Progress of one wave: its devices by phase (cumulative targets live in the plan)."""

    index: int
    size: str
    bake_seconds: float
    devices: int
    counts: dict[str, int]
    state: str  # done | current | waiting


class RolloutDevicePublic(_UtcOut):
    """One device's part in a rollout."""

    device_id: str
    wave: int
    phase: str
    attempts: int
    rollback_attempts: int
    late_joiner: bool
    last_error: str | None
    next_retry_at: datetime | None


class RolloutPublic(RolloutBase, _UtcOut):
    """A rollout in a listing: status, current wave and devices by phase."""

    id: int
    previous_version: str | None
    current_wave: int
    wave_count: int
    device_count: int
    counts: dict[str, int]
    reason: str | None
    created_at: datetime
    updated_at: datetime


class RolloutDetailPublic(RolloutPublic):
    """One rollout: plan, per-wave progress, per-device states, the gates as they stand, and its decisions."""

    plan: dict[str, Any]
    waves: list[RolloutWavePublic]
    devices: list[RolloutDevicePublic]
    gates: dict[str, Any] | None
    decisions: list[RolloutDecisionPublic]


class RolloutsPublic(SQLModel):
    """A listing of rollouts, newest first."""

    data: list[RolloutPublic]
    count: int


# -- identity: enrolment, certificates, API tokens ------------------------------------------------


class EnrolmentToken(SQLModel, table=True):
    """A one-time, expiring token that lets one device id enrol (only its sha256 is kept)."""

    __tablename__ = "enrolment_token"

    id: int | None = Field(default=None, primary_key=True)
    token_sha256: str = Field(unique=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = _when()
    expires_at: datetime = _when()
    used_at: datetime | None = _when(nullable=True)


class BootstrapSecret(SQLModel, table=True):
    """A fleet-wide enrolment secret for factory provisioning: any new device id may enrol with it (weaker)."""

    __tablename__ = "bootstrap_secret"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    secret_sha256: str = Field(unique=True, max_length=64)
    tags: dict[str, str] = _json(dict)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = _when()
    expires_at: datetime | None = _when(nullable=True)
    revoked_at: datetime | None = _when(nullable=True)
    uses: int = 0


class DeviceCertificate(SQLModel, table=True):
    """A client certificate the fleet CA issued to a device (serial in hex)."""

    __tablename__ = "device_certificate"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    serial: str = Field(unique=True, max_length=64)
    public_key_sha256: str = Field(index=True, max_length=64)
    not_after: datetime = _when()
    issued_at: datetime = _when()
    revoked_at: datetime | None = _when(nullable=True)


class ApiToken(SQLModel, table=True):
    """A named API token with one role (only its sha256 is kept)."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    role: str = Field(max_length=16)
    token_sha256: str = Field(unique=True, max_length=64)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = _when()
    last_used_at: datetime | None = _when(nullable=True)
    revoked_at: datetime | None = _when(nullable=True)


class ApiTokenPublic(_UtcOut):
    """A token as listings show it (never the secret)."""

    name: str
    role: str
    created_by: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
