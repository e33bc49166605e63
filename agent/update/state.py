"""The persisted update state: what the agent is doing for which desired generation.

Stored in `data_dir/update-state.json` as `{"format_version": 1, "state": {...}}`, written atomically at
every transition, so a restarted agent knows whether an update was interrupted and where.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator

from agent._fs import atomic_write_bytes
from protocol import ErrorInfo, ModelSpec, UpdatePhase, UpdateStatus

__all__ = ["FORMAT_VERSION", "IN_PROGRESS", "StateFile", "UpdateState"]

FORMAT_VERSION = 1

# Phases in which a step is still to be done (the worker runs one step per phase).
IN_PROGRESS = frozenset(
    {
        UpdatePhase.DOWNLOADING,
        UpdatePhase.VERIFYING,
        UpdatePhase.STAGING,
        UpdatePhase.LOADING,
        UpdatePhase.HEALTH_CHECK,
        UpdatePhase.SHADOW,
        UpdatePhase.SWITCHING,
        UpdatePhase.COMMITTING,
    }
)

log = logging.getLogger(__name__)


class UpdateState(BaseModel):
    """Progress towards one desired generation; immutable, changed only by `machine.handle`."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    generation: int | None = None  # the last desired generation taken up; None before the first
    phase: UpdatePhase = UpdatePhase.IDLE
    target: ModelSpec | None = None
    slot: str | None = None  # the slot the target is staged into
    error: ErrorInfo | None = None
    deployment_id: str | None = None
    resumes: int = 0  # how often this update was resumed after an agent restart
    boots: int = 0  # agent starts while the switched model was on trial (the A/B boot counter)

    @field_validator("phase", mode="before")
    @classmethod
    def _legacy_phase(cls, value: object) -> object:
        # Agents before the shadow run called the health check `warming_up`; it resumes as `health_check`.
        return UpdatePhase.HEALTH_CHECK if value in (UpdatePhase.WARMING_UP, "warming_up") else value

    @property
    def in_progress(self) -> bool:
        """True while a step of the update path is still to be done."""
        return self.phase in IN_PROGRESS

    def status(self) -> UpdateStatus | None:
        """The `UpdateStatus` the device reports; None before any desired state was seen."""
        if self.generation is None:
            return None
        target = self.target.ref if self.target is not None else None
        return UpdateStatus(generation=self.generation, phase=self.phase, target=target, error=self.error)


class StateFile:
    """Reads and atomically writes `update-state.json`."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> UpdateState:
        """The stored state; a missing, unreadable or foreign file gives a fresh state (with a warning)."""
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return UpdateState()
        except OSError as exc:
            log.warning("cannot read %s (%s); starting with a fresh update state", self.path, exc)
            return UpdateState()
        try:
            data = json.loads(raw)
            if not isinstance(data, dict) or data.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"format_version is not {FORMAT_VERSION}")
            return UpdateState.model_validate(data.get("state"))
        except (ValueError, ValidationError) as exc:
            log.warning("ignoring unusable update state %s (%s); starting fresh", self.path, exc)
            return UpdateState()

    def save(self, state: UpdateState) -> None:
        """Write `state` atomically (temp file + `os.replace`)."""
        body = {"format_version": FORMAT_VERSION, "state": state.model_dump(mode="json")}
        atomic_write_bytes(self.path, json.dumps(body, indent=2).encode())
