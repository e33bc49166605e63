"""What goes into `step` (observations, operator commands) and what comes out (actions, decisions).

All are plain pydantic data with a `kind` tag, so the service can store and show them as JSON:
actions are what the IO layer must do (publish a desired state, wake up later), decisions are the
audit trail (why a wave started, which gate failed with which figures, who paused the rollout).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

from cloud.rollouts.gates import CohortStats, GateReport
from protocol.messages import ReportedState, UpdatePhase

__all__ = [
    "Abort",
    "Action",
    "BakeStarted",
    "Command",
    "CommandRejected",
    "Completed",
    "Decision",
    "DeviceFailed",
    "DeviceJoined",
    "DeviceReport",
    "DeviceRolledBack",
    "DeviceTimedOut",
    "DeviceUpdated",
    "Dispatch",
    "GateFailed",
    "GateInconclusive",
    "GatePassed",
    "Observations",
    "Pause",
    "Promote",
    "Resume",
    "RetryScheduled",
    "Rollback",
    "RollbackFinished",
    "RollbackStarted",
    "RolloutAborted",
    "RolloutPaused",
    "RolloutResumed",
    "RolloutStarted",
    "Wait",
    "WavePromoted",
    "WaveSkipped",
    "WaveStarted",
]


class _Record(BaseModel):
    """Immutable data; unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)


# --- inputs -------------------------------------------------------------------------------------


class DeviceReport(_Record):
    """What a device last said: the model it runs and how its latest update went, at time `at`.

    A failure counts for the attempt in flight only if `at` is not before that attempt was dispatched
    (an older report belongs to an earlier attempt) and, when `target_version` is given, it matches.
    """

    device_id: str
    at: datetime
    active_model: str | None = None
    active_version: str | None = None
    update_phase: UpdatePhase | None = None
    target_version: str | None = None
    error: str | None = None

    @classmethod
    def from_reported(cls, state: ReportedState) -> DeviceReport:
        """The report carried by a device's retained `ReportedState`."""
        update = state.update
        return cls(
            device_id=state.device_id,
            at=state.reported_at,
            active_model=state.active_model.name if state.active_model else None,
            active_version=state.active_model.version if state.active_model else None,
            update_phase=update.phase if update else None,
            target_version=update.target.version if update and update.target else None,
            error=update.error.message if update and update.error else None,
        )


class _Command(_Record):
    """An operator command; `command_id` makes a replay harmless."""

    command_id: str = Field(min_length=1)  # unique per command: a replayed command is applied once
    by: str = "operator"


class Pause(_Command):
    """Stop dispatching; results of installs in flight are still recorded."""

    kind: Literal["pause"] = "pause"
    reason: str = "paused by operator"


class Resume(_Command):
    """Continue a paused rollout where it stopped (a bake restarts from now)."""

    kind: Literal["resume"] = "resume"


class Abort(_Command):
    """Stop for good; with `rollback`, send every touched device back to the previous version."""

    kind: Literal["abort"] = "abort"
    rollback: bool = False
    reason: str = "aborted by operator"


class Promote(_Command):
    """Skip the rest of the current wave's bake and its gates, and start the next wave now."""

    kind: Literal["promote"] = "promote"


Command = Annotated[Pause | Resume | Abort | Promote, Field(discriminator="kind")]


class Observations(_Record):
    """Everything `step` learns since the last step.

    `fleet` maps every known device id to its tags (None: unchanged since the last step; the first
    step needs it). `wave` and `control` are the telemetry of `state.updated_cohort()` and
    `state.control_cohort()`; install figures are filled in by the engine from its own records.
    """

    reports: list[DeviceReport] = Field(default_factory=list)
    fleet: dict[str, dict[str, str]] | None = None
    wave: CohortStats | None = None
    control: CohortStats | None = None
    commands: list[Command] = Field(default_factory=list)


# --- actions ------------------------------------------------------------------------------------


class Dispatch(_Record):
    """Set the device's desired model to `model:version` (attempt `attempt`; republishing is harmless)."""

    kind: Literal["dispatch"] = "dispatch"
    device_id: str
    model: str
    version: str
    attempt: int


class Rollback(_Record):
    """Set the device's desired model back to `model:to_version`."""

    kind: Literal["rollback"] = "rollback"
    device_id: str
    model: str
    to_version: str
    attempt: int


class Wait(_Record):
    """Call `step` again at `until` at the latest (a bake ends, a retry is due or a device times out)."""

    kind: Literal["wait"] = "wait"
    until: datetime


Action = Annotated[Dispatch | Rollback | Wait, Field(discriminator="kind")]


# --- decisions ----------------------------------------------------------------------------------


class _Decision(_Record):
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


class GatePassed(_Decision):
    """The wave's gates all passed at the end of its bake."""

    kind: Literal["gate_passed"] = "gate_passed"
    wave: int
    report: GateReport


class GateFailed(_Decision):
    """A gate failed; the report holds every gate's figures."""

    kind: Literal["gate_failed"] = "gate_failed"
    wave: int
    report: GateReport


class GateInconclusive(_Decision):
    """Gates still lacked data `max_data_wait_seconds` after the bake."""

    kind: Literal["gate_inconclusive"] = "gate_inconclusive"
    wave: int
    report: GateReport


class WavePromoted(_Decision):
    """An operator skipped the rest of the wave's bake and gates."""

    kind: Literal["wave_promoted"] = "wave_promoted"
    wave: int
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
