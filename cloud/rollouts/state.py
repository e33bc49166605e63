"""The persisted state of one rollout: its status, current wave and one record per device.

Everything is plain pydantic data, so the service stores `state.model_dump_json()` (with
`format_version`) and restores it with `RolloutState.model_validate_json`.
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

from cloud.rollouts.gates import CohortStats

__all__ = ["FORMAT_VERSION", "DevicePhase", "DeviceRecord", "RolloutState", "RolloutStatus"]

FORMAT_VERSION = 1


class RolloutStatus(StrEnum):
    """Where a rollout is (see the state diagram in `cloud.rollouts`)."""

    PENDING = "pending"
    RUNNING = "running"
    BAKING = "baking"
    PAUSED = "paused"
    COMPLETED = "completed"
    ABORTED = "aborted"
    ROLLING_BACK = "rolling_back"
    ROLLED_BACK = "rolled_back"


class DevicePhase(StrEnum):
    """Where one device is: on the way to the target version, or back to the previous one."""

    PENDING = "pending"  # waiting for its wave, a free download slot or its retry time
    DISPATCHED = "dispatched"  # told to install the target, no result yet
    SUCCEEDED = "succeeded"  # runs the target version
    FAILED = "failed"  # gave up after max_retries (still runs its previous model)
    ROLLBACK_PENDING = "rollback_pending"  # to be told to go back to the previous version
    ROLLING_BACK = "rolling_back"  # told to go back, no result yet
    ROLLED_BACK = "rolled_back"  # runs the previous version again
    ROLLBACK_FAILED = "rollback_failed"  # gave up rolling back after max_retries


# Phases in which a device holds a download slot.
IN_FLIGHT = frozenset({DevicePhase.DISPATCHED, DevicePhase.ROLLING_BACK})
# Statuses in which nothing more will happen.
TERMINAL = frozenset({RolloutStatus.ABORTED, RolloutStatus.ROLLED_BACK})


class DeviceRecord(BaseModel):
    """One device's progress in the rollout (`wave`: a 0-based index into the plan's waves)."""

    wave: int = Field(ge=0)
    phase: DevicePhase = DevicePhase.PENDING
    attempts: int = Field(default=0, ge=0)  # update dispatches so far
    rollback_attempts: int = Field(default=0, ge=0)
    dispatched_at: datetime | None = None  # of the attempt in flight
    next_retry_at: datetime | None = None
    last_error: str | None = None
    late_joiner: bool = False


class RolloutState(BaseModel):
    """A rollout's whole state; `step` returns a new one and never mutates its input."""

    model_config = ConfigDict(extra="forbid")

    format_version: int = FORMAT_VERSION
    rollout_id: str = Field(min_length=1)
    status: RolloutStatus = RolloutStatus.PENDING
    current_wave: int = Field(default=0, ge=0)  # 0-based index into the plan's waves
    wave_started_at: datetime | None = None
    bake_started_at: datetime | None = None
    paused_from: RolloutStatus | None = None
    reason: str | None = None  # why it is paused, aborted or rolling back
    devices: dict[str, DeviceRecord] = Field(default_factory=dict)
    last_control: CohortStats | None = None  # the control cohort last seen with devices in it
    # What the current wave's gates wait for (the control cohort unusable, data missing after the bake),
    # for status pages; None when nothing is amiss or the rollout is not judging a wave.
    waiting: str | None = None
    waiting_since: datetime | None = None  # the end of the bake, once gates were found lacking data after it
    control_mismatch_wave: int | None = None  # the wave whose unusable control cohort was recorded (once a wave)
    applied_commands: list[str] = Field(default_factory=list)  # command ids, so a replay is a no-op

    @classmethod
    def new(cls, rollout_id: str) -> RolloutState:
        """A rollout that has not started yet."""
        return cls(rollout_id=rollout_id)

    def in_flight(self) -> int:
        """Devices holding a download slot."""
        return sum(1 for d in self.devices.values() if d.phase in IN_FLIGHT)

    def updated_cohort(self) -> list[str]:
        """Devices on the target version: the cohort the gates judge."""
        return sorted(i for i, d in self.devices.items() if d.phase is DevicePhase.SUCCEEDED)

    def control_cohort(self) -> list[str]:
        """Selected devices not touched yet (still on the previous version): the control cohort."""
        return sorted(i for i, d in self.devices.items() if d.phase is DevicePhase.PENDING and d.attempts == 0)
