"""Deployments: which model version goes to which devices, and each device's progress."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import BigInteger, Index, UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, json_column, when

__all__ = [
    "Deployment",
    "DeploymentBase",
    "DeploymentPublic",
    "DeploymentTarget",
    "DeploymentTargetBase",
    "DeploymentTargetPublic",
    "DeploymentsPublic",
    "TargetStatus",
]


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
    # The alias the request named (`digits@production`), resolved to `model_version` at creation; null: none.
    model_alias: str | None = Field(default=None, max_length=128)
    sha256: str = Field(max_length=64)
    target: dict[str, Any] = json_column(dict)


class Deployment(DeploymentBase, table=True):
    """One deployment request."""

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = when()


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
    __table_args__ = (
        UniqueConstraint("deployment_id", "device_id", name="uq_target_deployment_device"),
        # Every report and event of a device looks up its targets of one generation (`_advance_targets`).
        Index("ix_deployment_target_device_generation", "device_id", "generation"),
    )

    id: int | None = Field(default=None, primary_key=True)
    deployment_id: int = Field(foreign_key="deployment.id", index=True)
    updated_at: datetime = when()


class DeploymentTargetPublic(DeploymentTargetBase, UtcOut):
    """A target as the API shows it."""

    updated_at: datetime


class DeploymentPublic(DeploymentBase, UtcOut):
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
