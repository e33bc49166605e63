"""Federated learning: the devices registered as Flower SuperNodes, and federated runs with their progress."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, json_column, when

__all__ = [
    "FederatedRun",
    "FederatedRunPublic",
    "FederatedRunsPublic",
    "FlowerNode",
    "RunStatus",
]


class FlowerNode(SQLModel, table=True):
    """A device's SuperNode identity: its enrolment public key (OpenSSH form) as registered with the SuperLink.

    Flower node ids are unsigned 64-bit: kept as text. Unregistering is one-way in Flower (a key is never accepted
    again), so an unregistered row stays as the record of why that key is refused.
    """

    __tablename__ = "flower_node"

    device_id: str = Field(primary_key=True, max_length=128)
    node_id: str = Field(index=True, max_length=32)
    public_key: str
    registered_at: datetime = when()
    unregistered_at: datetime | None = when(nullable=True)


class RunStatus(StrEnum):
    """Where a federated run is: Flower's run, then the candidate built from its result."""

    PENDING = "pending"
    RUNNING = "running"
    BUILDING = "building"
    COMPLETED = "completed"
    FAILED = "failed"
    STOPPED = "stopped"

    @property
    def finished(self) -> bool:
        return self in (RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.STOPPED)


class FederatedRunBase(SQLModel):
    model_name: str = Field(index=True, max_length=128)
    parent_version: str = Field(max_length=64)
    selector: dict[str, str] = json_column(dict)
    params: dict[str, Any] = json_column(dict)
    status: str = Field(default=RunStatus.PENDING.value, max_length=16, index=True)
    flower_run_id: str | None = Field(default=None, max_length=32)
    node_ids: list[str] = json_column(list)
    rounds: list[dict[str, Any]] = json_column(list)
    candidate_version: str | None = Field(default=None, max_length=64)
    rollout_id: int | None = None
    error: str | None = None
    created_by: str | None = Field(default=None, max_length=128)


class FederatedRun(FederatedRunBase, table=True):
    """One federated retraining run of a registered version on a cohort of devices."""

    __tablename__ = "federated_run"

    id: int | None = Field(default=None, primary_key=True)
    devices: list[str] = json_column(list)
    summary: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    created_at: datetime = when()
    updated_at: datetime = when()
    finished_at: datetime | None = when(nullable=True)


class FederatedRunPublic(FederatedRunBase, UtcOut):
    id: int
    devices: list[str] = []
    summary: dict[str, Any] | None = None
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None


class FederatedRunsPublic(SQLModel):
    data: list[FederatedRunPublic]
    count: int
