"""What goes into `step`: device reports, operator commands, and the observations that carry them.

Plain pydantic data with a `kind` tag on commands, so the service can store commands as JSON and replay
them after a restart (a command's id makes a replay harmless).
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from cloud.rollouts._base import Record
from cloud.rollouts.gates import CohortStats
from protocol.messages import ReportedState, UpdatePhase

__all__ = ["Abort", "Command", "DeviceReport", "Observations", "Pause", "Promote", "Resume"]


class DeviceReport(Record):
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


class _Command(Record):
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
    """Skip the rest of the current wave's bake and its gates, and start the next wave now.

    With `to_wave` (a 0-based wave index) start that wave instead, and with `to_percent` the furthest wave
    that keeps at most that share of the selected devices on the new version (`plan.promotion_target`): the
    waves in between are promoted too, their devices install along with it.
    """

    kind: Literal["promote"] = "promote"
    to_wave: int | None = Field(default=None, ge=0)
    to_percent: float | None = Field(default=None, gt=0, le=100)

    @model_validator(mode="after")
    def _one_target(self) -> Self:
        if self.to_wave is not None and self.to_percent is not None:
            raise ValueError("promote to a wave or to a percentage, not both")
        return self


Command = Annotated[Pause | Resume | Abort | Promote, Field(discriminator="kind")]


class Observations(Record):
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
