"""Continuous training: per-model policies that turn a drift alert into a federated run, and the actions taken."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import JSON, Column
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, when


class CtTrigger(StrEnum):
    """Which alert starts the loop."""

    DRIFT = "drift"  # any drift statistic of the cohort (the `drift` alert rule)
    ACCURACY = "estimated_accuracy"  # the estimated accuracy fell too far (the `estimated_accuracy` rule)
    LABELLED = "labelled_accuracy"  # the labelled accuracy fell too far (the `labelled_accuracy` rule)


class CtStep(StrEnum):
    """Steps of the loop a policy can make wait for a person."""

    RETRAIN = "retrain"  # starting the federated run
    ROLLOUT = "rollout"  # rolling the candidate out (without: the candidate is built, signed and left for a person)
    PROMOTE = "promote"  # promoting the candidate past its canary wave, once that wave passed its gates


class CtPolicyBase(SQLModel):
    """What to do when a model's cohort drifts."""

    model_name: str = Field(index=True, unique=True, max_length=128)
    trigger: str = Field(default=CtTrigger.DRIFT.value, max_length=32)
    by: str = Field(default="site", max_length=64)  # the device tag whose values are the cohorts
    retrain: str = Field(default="federated", max_length=16)  # federated (the one way today)
    rounds: int = Field(default=3, ge=1, le=1000)
    strategy: str = Field(default="fedavg", max_length=16)
    min_nodes: int = Field(default=2, ge=1, le=100_000)
    local_epochs: int = Field(default=1, ge=1, le=100)
    lr: float = Field(default=0.01, gt=0, le=10)
    rollout: str = Field(default="canary", max_length=16)  # canary | none
    wait_for: str = Field(default="", max_length=64)  # comma-separated `CtStep`s a person must approve
    cooldown_s: int = Field(default=3600, ge=0, le=90 * 86400)  # after an action ends, before another on the cohort
    enabled: bool = True
    # The candidate's canary plan over the federated default (waves, gates: as for POST /rollouts), and the
    # accuracy gate of the candidate against its parent; None: the federated run's defaults.
    rollout_plan: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    max_accuracy_drop: float | None = Field(default=None, ge=0, le=1)


class CtPolicy(CtPolicyBase, table=True):
    """A model's continuous-training policy (one per model)."""

    __tablename__ = "ct_policy"

    id: int | None = Field(default=None, primary_key=True)
    created_by: str | None = Field(default=None, max_length=160)
    created_at: datetime = when()
    updated_at: datetime = when()


class CtPolicyPublic(CtPolicyBase, UtcOut):
    id: int
    created_by: str | None = None
    created_at: datetime
    updated_at: datetime


class CtActionStatus(StrEnum):
    """Where one turn of the loop is."""

    AWAITING_RETRAIN = "awaiting_retrain"  # a person must approve the federated run
    TRAINING = "training"  # the federated run (and its candidate build) is under way
    AWAITING_ROLLOUT = "awaiting_rollout"  # the candidate is built; a person must approve its canary
    ROLLING_OUT = "rolling_out"  # the canary rollout decides
    AWAITING_PROMOTION = "awaiting_promotion"  # the canary wave passed its gates; a person must approve the rest
    PROMOTED = "promoted"  # the canary completed: the candidate runs on the cohort
    ROLLED_BACK = "rolled_back"  # a gate failed: the cohort is back on the parent
    FAILED = "failed"  # the run or the build failed (see detail)
    REJECTED = "rejected"  # a person declined a step

    @property
    def finished(self) -> bool:
        return self in _FINISHED


_FINISHED = frozenset(
    {CtActionStatus.PROMOTED, CtActionStatus.ROLLED_BACK, CtActionStatus.FAILED, CtActionStatus.REJECTED}
)


class CtActionBase(SQLModel):
    """One turn of the loop: an alert on a cohort, the run it started, the candidate and its rollout."""

    policy_id: int = Field(foreign_key="ct_policy.id", index=True)
    model_name: str = Field(index=True, max_length=128)
    version: str = Field(max_length=64)  # the parent: the version that drifted
    cohort: str = Field(max_length=256)  # `<tag>=<value>`
    alert_id: int | None = Field(default=None, index=True)
    status: str = Field(default=CtActionStatus.TRAINING.value, index=True, max_length=32)
    federated_run_id: int | None = None
    candidate_version: str | None = Field(default=None, max_length=64)
    rollout_id: int | None = None
    detail: str = Field(default="", max_length=2000)
    approved_by: str | None = Field(default=None, max_length=160)


class CtAction(CtActionBase, table=True):
    """A turn of the loop as stored."""

    __tablename__ = "ct_action"

    id: int | None = Field(default=None, primary_key=True)
    created_at: datetime = when()
    updated_at: datetime = when()
    finished_at: datetime | None = when(nullable=True)


class CtActionPublic(CtActionBase, UtcOut):
    id: int
    created_at: datetime
    updated_at: datetime
    finished_at: datetime | None = None
