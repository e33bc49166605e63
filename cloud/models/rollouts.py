"""Quality-gated rollouts: plan and engine state as JSON, decisions, operator commands, dispatches."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, json_column, when

__all__ = [
    "Rollout",
    "RolloutBase",
    "RolloutCommandRecord",
    "RolloutDecisionPublic",
    "RolloutDecisionRecord",
    "RolloutDetailPublic",
    "RolloutDevicePublic",
    "RolloutDispatchRecord",
    "RolloutPublic",
    "RolloutWavePublic",
    "RolloutsPublic",
]


class RolloutBase(SQLModel):
    """Which model version a rollout takes to the fleet, and where it stands."""

    model_name: str = Field(index=True, max_length=128)
    model_version: str = Field(max_length=64)
    status: str = Field(default="pending", index=True, max_length=16)


class Rollout(RolloutBase, table=True):
    """A quality-gated rollout: its plan and the engine's state (`cloud.rollouts`), both as JSON."""

    id: int | None = Field(default=None, primary_key=True)
    plan: dict[str, Any] = json_column(dict)
    state: dict[str, Any] = json_column(dict)
    format_version: int = 1  # of `state` (`cloud.rollouts.state.FORMAT_VERSION`)
    next_step_at: datetime | None = when(nullable=True)  # the engine's last `Wait`
    created_at: datetime = when()
    updated_at: datetime = when()


class RolloutDecisionRecord(SQLModel, table=True):
    """One decision of a rollout's engine (`cloud.rollouts.Decision`), numbered from 1 per rollout."""

    __tablename__ = "rollout_decision"
    __table_args__ = (UniqueConstraint("rollout_id", "seq", name="uq_rollout_decision_seq"),)

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    seq: int
    kind: str = Field(max_length=32)
    message: str = ""
    figures: dict[str, Any] = json_column(dict)
    at: datetime = when()


class RolloutCommandRecord(SQLModel, table=True):
    """An operator command (pause, resume, abort, promote) kept until the engine has applied it."""

    __tablename__ = "rollout_command"

    id: int | None = Field(default=None, primary_key=True)
    rollout_id: int = Field(foreign_key="rollout.id", index=True)
    command_id: str = Field(unique=True, max_length=64)
    kind: str = Field(max_length=16)
    body: dict[str, Any] = json_column(dict)
    created_at: datetime = when()
    applied_at: datetime | None = when(nullable=True)


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
    created_at: datetime = when()


class RolloutDecisionPublic(UtcOut):
    """A decision as the API shows it; `figures` holds its data (e.g. a gate report).

    A decision about a wave carries `wave` (0-based index) and `wave_number` (from 1, as its message says).
    """

    seq: int
    kind: str
    message: str
    figures: dict[str, Any]
    at: datetime


class RolloutWavePublic(SQLModel):
    """Progress of one wave: its devices by phase (cumulative targets live in the plan)."""

    index: int  # 0-based, into the plan's waves
    number: int  # index + 1: the wave as the CLI and messages number it
    size: str
    bake_seconds: float
    devices: int
    counts: dict[str, int]
    state: str  # done | current | waiting


class RolloutDevicePublic(UtcOut):
    """One device's part in a rollout."""

    device_id: str
    wave: int  # 0-based index
    wave_number: int  # from 1
    phase: str
    attempts: int
    rollback_attempts: int
    late_joiner: bool
    last_error: str | None
    next_retry_at: datetime | None


class RolloutPublic(RolloutBase, UtcOut):
    """A rollout in a listing: status, current wave and devices by phase."""

    id: int
    previous_version: str | None
    baseline: str  # control | absolute: what the gates judge the updated cohort against
    current_wave: int  # 0-based index
    current_wave_number: int  # from 1, as the CLI shows it ("wave 2/4")
    wave_count: int
    device_count: int
    counts: dict[str, int]
    reason: str | None  # why it is paused, aborted or rolling back
    waiting: str | None  # what the current wave's gates wait for (data, a usable control cohort), if anything
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
