"""The engine's decisions: the audit trail of a rollout (why a wave started, which gate failed with which figures,
who paused it). Each has a `kind` tag, a time and a message; the service stores them numbered per rollout.

Fields named `wave` are 0-based indexes into the plan's waves; messages number waves from 1, as people read them.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from cloud.rollouts._base import Record
from cloud.rollouts.gates import GateReport

__all__ = [
    "BakeStarted",
    "CommandRejected",
    "Completed",
    "ControlMismatch",
    "Decision",
    "DeviceFailed",
    "DeviceJoined",
    "DeviceRolledBack",
    "DeviceTimedOut",
    "DeviceUpdated",
    "GateFailed",
    "GateInconclusive",
    "GatePassed",
    "GatesWaiting",
    "RetryScheduled",
    "RollbackFinished",
    "RollbackStarted",
    "RolloutAborted",
    "RolloutPaused",
    "RolloutResumed",
    "RolloutStarted",
    "WavePromoted",
    "WaveSkipped",
    "WaveStarted",
]


class _Decision(Record):
    """Something the engine decided or learnt, at `at`, said in `message`."""

    at: datetime
    message: str


class RolloutStarted(_Decision):
    """The rollout took its devices and cut them into waves."""

    kind: Literal["rollout_started"] = "rollout_started"
    devices: int
    wave_sizes: list[int]


class WaveStarted(_Decision):
    """A wave began: its devices may now be dispatched."""

    kind: Literal["wave_started"] = "wave_started"
    wave: int
    devices: int


class WaveSkipped(_Decision):
    """A wave added no device of its own and was passed over."""

    kind: Literal["wave_skipped"] = "wave_skipped"
    wave: int


class BakeStarted(_Decision):
    """Every device of the wave finished installing; the bake runs until `until`."""

    kind: Literal["bake_started"] = "bake_started"
    wave: int
    until: datetime
    succeeded: int
    failed: int


class _GateDecision(_Decision):
    """A verdict on a wave's gates; `report` holds every gate's figures."""

    wave: int
    report: GateReport


class GatePassed(_GateDecision):
    """The wave's gates all passed at the end of its bake."""

    kind: Literal["gate_passed"] = "gate_passed"


class GateFailed(_GateDecision):
    """A gate failed."""

    kind: Literal["gate_failed"] = "gate_failed"


class GateInconclusive(_GateDecision):
    """Gates still lacked data `max_data_wait_seconds` after the bake."""

    kind: Literal["gate_inconclusive"] = "gate_inconclusive"


class GatesWaiting(_GateDecision):
    """The bake is over but some gates lack data: they are re-checked until `until`, then the rollout pauses."""

    kind: Literal["gates_waiting"] = "gates_waiting"
    until: datetime


class ControlMismatch(_Decision):
    """The control cohort serves another model (or none, or nothing is left of it): comparisons cannot decide."""

    kind: Literal["control_mismatch"] = "control_mismatch"
    wave: int
    runs: dict[str, int]
    expected: str


class WavePromoted(_Decision):
    """An operator skipped the rest of the wave's bake and gates (and those of waves up to `to_wave`)."""

    kind: Literal["wave_promoted"] = "wave_promoted"
    wave: int
    to_wave: int
    by: str


class RolloutPaused(_Decision):
    """The rollout stopped dispatching, by an operator or by the gates."""

    kind: Literal["rollout_paused"] = "rollout_paused"
    reason: str
    by: str


class RolloutResumed(_Decision):
    """An operator resumed a paused rollout."""

    kind: Literal["rollout_resumed"] = "rollout_resumed"
    by: str


class RolloutAborted(_Decision):
    """An operator aborted the rollout."""

    kind: Literal["rollout_aborted"] = "rollout_aborted"
    reason: str
    by: str


class RollbackStarted(_Decision):
    """Every device the rollout touched is being sent back to the previous version."""

    kind: Literal["rollback_started"] = "rollback_started"
    reason: str
    devices: int


class RollbackFinished(_Decision):
    """Every touched device is back, or gave up."""

    kind: Literal["rollback_finished"] = "rollback_finished"
    rolled_back: int
    failed: int


class Completed(_Decision):
    """The last wave passed its gates."""

    kind: Literal["completed"] = "completed"
    succeeded: int
    failed: int


class DeviceJoined(_Decision):
    """A device matching the selector appeared after the start and joined a wave."""

    kind: Literal["device_joined"] = "device_joined"
    device_id: str
    wave: int


class DeviceUpdated(_Decision):
    """A device runs the target version."""

    kind: Literal["device_updated"] = "device_updated"
    device_id: str
    attempt: int


class DeviceFailed(_Decision):
    """A device gave up after all its attempts (of the update, or of the rollback)."""

    kind: Literal["device_failed"] = "device_failed"
    device_id: str
    attempts: int
    error: str
    rollback: bool


class DeviceTimedOut(_Decision):
    """An attempt got no result within `device_timeout_seconds`."""

    kind: Literal["device_timed_out"] = "device_timed_out"
    device_id: str
    attempt: int
    rollback: bool


class RetryScheduled(_Decision):
    """A failed attempt will be retried at `retry_at`."""

    kind: Literal["retry_scheduled"] = "retry_scheduled"
    device_id: str
    attempt: int
    retry_at: datetime
    rollback: bool


class DeviceRolledBack(_Decision):
    """A device runs the previous version again."""

    kind: Literal["device_rolled_back"] = "device_rolled_back"
    device_id: str


class CommandRejected(_Decision):
    """An operator command made no sense in the rollout's state."""

    kind: Literal["command_rejected"] = "command_rejected"
    command_id: str
    command: str


Decision = Annotated[
    RolloutStarted
    | WaveStarted
    | WaveSkipped
    | BakeStarted
    | GatePassed
    | GateFailed
    | GateInconclusive
    | GatesWaiting
    | ControlMismatch
    | WavePromoted
    | RolloutPaused
    | RolloutResumed
    | RolloutAborted
    | RollbackStarted
    | RollbackFinished
    | Completed
    | DeviceJoined
    | DeviceUpdated
    | DeviceFailed
    | DeviceTimedOut
    | RetryScheduled
    | DeviceRolledBack
    | CommandRejected,
    Field(discriminator="kind"),
]
