"""The pure decision core of the update path: `handle(state, event) -> next state`, no IO.

    idle ─► downloading ─► verifying ─► staging ─► loading ─► warming_up ─► switching ─► active
                │              │           │          │            │             │
                └──────────────┴───────────┴──────────┴────────────┴─────────────┴──► failed

The executor performs the step of the current phase and feeds back `StepSucceeded` or `StepFailed`;
the daemon feeds `DesiredReceived` (from MQTT) and `Restarted` (at start-up). A later phase (health
check, shadow run) is one more row in `NEXT_PHASE` and one more step in the executor's table.
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.update.state import UpdateState
from protocol import DesiredState, ErrorCode, ErrorInfo, EventKind, ModelRef, UpdatePhase

__all__ = [
    "MAX_RESUMES",
    "NEXT_PHASE",
    "SLOTS",
    "DesiredReceived",
    "Event",
    "Restarted",
    "StepFailed",
    "StepSucceeded",
    "handle",
    "other_slot",
    "transition_event",
]

SLOTS = ("a", "b")
# An update interrupted this often (e.g. the runtime crashes the process while loading) is abandoned.
MAX_RESUMES = 3

# Where a successful step leads.
NEXT_PHASE: dict[UpdatePhase, UpdatePhase] = {
    UpdatePhase.DOWNLOADING: UpdatePhase.VERIFYING,
    UpdatePhase.VERIFYING: UpdatePhase.STAGING,
    UpdatePhase.STAGING: UpdatePhase.LOADING,
    UpdatePhase.LOADING: UpdatePhase.WARMING_UP,
    UpdatePhase.WARMING_UP: UpdatePhase.SWITCHING,
    UpdatePhase.SWITCHING: UpdatePhase.ACTIVE,
}

# Phases after which the target file sits complete and verified in the inactive slot.
_STAGED = frozenset({UpdatePhase.LOADING, UpdatePhase.WARMING_UP, UpdatePhase.SWITCHING})


@dataclass(frozen=True)
class DesiredReceived:
    """A valid desired state for this device arrived; `active`/`staged` describe the slots right now."""

    desired: DesiredState
    active: ModelRef | None = None
    active_slot: str | None = None
    staged: ModelRef | None = None  # verified content of the inactive slot, if any


@dataclass(frozen=True)
class StepSucceeded:
    """The step of the current phase is done."""


@dataclass(frozen=True)
class StepFailed:
    """The step of the current phase failed for `error`."""

    error: ErrorInfo


@dataclass(frozen=True)
class Restarted:
    """The agent started with this state on disk; `active`/`staged` describe the slots it found."""

    active: ModelRef | None = None
    active_slot: str | None = None
    staged: ModelRef | None = None


Event = DesiredReceived | StepSucceeded | StepFailed | Restarted


def other_slot(slot: str | None) -> str:
    """The slot that is not `slot` (`a` when there is no active slot yet)."""
    return "b" if slot == "a" else "a"


def _on_desired(state: UpdateState, event: DesiredReceived) -> UpdateState:
    desired = event.desired
    if state.generation is not None and desired.generation <= state.generation:
        return state  # a duplicate or stale generation: applied, failed or under way already, never retried
    base = {"generation": desired.generation, "deployment_id": desired.deployment_id, "error": None, "resumes": 0}
    model = desired.model
    if model is None:
        # Nothing desired: keep serving what runs (unloading is the operator's explicit choice, not a default).
        return UpdateState(phase=UpdatePhase.IDLE, **base)
    if model.ref == event.active:
        return UpdateState(phase=UpdatePhase.ACTIVE, target=model, **base)
    if state.in_progress and state.target is not None and state.target.ref == model.ref:
        # A newer generation for the same model (e.g. a redeploy): keep going where we are.
        return state.model_copy(update={"generation": desired.generation, "deployment_id": desired.deployment_id})
    slot = other_slot(event.active_slot)
    phase = UpdatePhase.LOADING if model.ref == event.staged else UpdatePhase.DOWNLOADING
    return UpdateState(phase=phase, target=model, slot=slot, **base)


def _on_success(state: UpdateState, _event: StepSucceeded) -> UpdateState:
    nxt = NEXT_PHASE.get(state.phase)
    if nxt is None:
        return state
    return state.model_copy(update={"phase": nxt, "error": None})


def _on_failure(state: UpdateState, event: StepFailed) -> UpdateState:
    if not state.in_progress:
        return state
    return state.model_copy(update={"phase": UpdatePhase.FAILED, "error": event.error})


def _on_restart(state: UpdateState, event: Restarted) -> UpdateState:
    target = state.target
    if target is None or not (state.in_progress or state.phase is UpdatePhase.ACTIVE):
        return state
    if target.ref == event.active:
        # The switch reached disk before the restart (or nothing was interrupted): the update is done.
        return state if state.phase is UpdatePhase.ACTIVE else state.model_copy(update={"phase": UpdatePhase.ACTIVE})
    if state.resumes >= MAX_RESUMES:
        error = ErrorInfo.of(
            ErrorCode.INTERNAL, f"update interrupted {state.resumes + 1} times in phase {state.phase.value}; abandoned"
        )
        return state.model_copy(update={"phase": UpdatePhase.FAILED, "error": error})
    if state.phase is UpdatePhase.ACTIVE:
        # The active slot no longer holds the model we switched to (lost or corrupted on disk): fetch it again.
        slot = other_slot(event.active_slot)
        return state.model_copy(update={"phase": UpdatePhase.DOWNLOADING, "slot": slot, "resumes": state.resumes + 1})
    resume_at = UpdatePhase.LOADING if state.phase in _STAGED and event.staged == target.ref else None
    return state.model_copy(
        update={"phase": resume_at or UpdatePhase.DOWNLOADING, "resumes": state.resumes + 1, "error": None}
    )


def transition_event(old: UpdateState, new: UpdateState) -> EventKind | None:
    """The device event that reports the step from `old` to `new`, if any."""
    if new.phase is UpdatePhase.FAILED:
        return EventKind.UPDATE_FAILED
    if new.phase is UpdatePhase.ACTIVE:
        return EventKind.UPDATE_ACTIVATED
    if new.in_progress:
        started = not old.in_progress or old.generation != new.generation
        return EventKind.UPDATE_STARTED if started else EventKind.UPDATE_PROGRESS
    return None


def handle(state: UpdateState, event: Event) -> UpdateState:
    """The state after `event`; returns `state` itself when the event changes nothing."""
    match event:
        case DesiredReceived():
            return _on_desired(state, event)
        case StepSucceeded():
            return _on_success(state, event)
        case StepFailed():
            return _on_failure(state, event)
        case Restarted():
            return _on_restart(state, event)
    raise TypeError(f"not an update event: {event!r}")
