"""The pure decision core of the update path: `handle(state, event) -> next state`, no IO.

    idle ─► downloading ─► verifying ─► staging ─► loading ─► health_check ─► shadow ─► switching ─┐
                │              │           │          │             │            │           │     │
                └──────────────┴───────────┴──────────┴─────────────┴────────────┴───────────┴─► failed
    ┌──────────────────────────────────────────────────────────────────────────────────────────────┘
    └─► committing (the switched model on trial, boot counter) ─► active
              └──────────────────────────────────────────────────► rolled_back (previous slot serves again)

The executor performs the step of the current phase and feeds back `StepSucceeded` or `StepFailed`;
the daemon feeds `DesiredReceived` (from MQTT), `Booted` (first thing at start-up, before a model is
loaded: the boot counter of a trial) and `Restarted` (once the active slot is loaded). A failure before
the switch leaves the previous model serving (`failed`); a failure of the trial after it, or too many
agent starts during the trial, goes back to the previous slot (`rolled_back`).
"""

from __future__ import annotations

from dataclasses import dataclass

from agent.update.state import UpdateState
from protocol import DesiredState, ErrorCode, ErrorInfo, EventKind, ModelRef, UpdatePhase

__all__ = [
    "MAX_RESUMES",
    "NEXT_PHASE",
    "SLOTS",
    "Booted",
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
    UpdatePhase.LOADING: UpdatePhase.HEALTH_CHECK,
    UpdatePhase.HEALTH_CHECK: UpdatePhase.SHADOW,
    UpdatePhase.SHADOW: UpdatePhase.SWITCHING,
    UpdatePhase.SWITCHING: UpdatePhase.COMMITTING,
    UpdatePhase.COMMITTING: UpdatePhase.ACTIVE,
}

# Phases in which the target file may sit complete and verified in the inactive slot (resume at loading).
_STAGED = frozenset(
    {UpdatePhase.STAGING, UpdatePhase.LOADING, UpdatePhase.HEALTH_CHECK, UpdatePhase.SHADOW, UpdatePhase.SWITCHING}
)


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


@dataclass(frozen=True)
class Booted:
    """The agent is starting, before it loads a model: `active_slot` is the slot pointer on disk and
    `previous` the verified model of the slot a rollback would go back to (the one the update replaced)."""

    active_slot: str | None
    previous: ModelRef | None
    max_trial_boots: int


Event = DesiredReceived | StepSucceeded | StepFailed | Restarted | Booted


def other_slot(slot: str | None) -> str:
    """The slot that is not `slot` (`a` when there is no active slot yet)."""
    return "b" if slot == "a" else "a"


def _on_desired(state: UpdateState, event: DesiredReceived) -> UpdateState:
    desired = event.desired
    if state.generation is not None and desired.generation <= state.generation:
        return state  # a duplicate or stale generation: applied, failed or under way already, never retried
    base = {
        "generation": desired.generation,
        "deployment_id": desired.deployment_id,
        "error": None,
        "resumes": 0,
        "boots": 0,
    }
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
    # Before the switch the previous model never stopped serving; after it, the trial goes back to it.
    phase = UpdatePhase.ROLLED_BACK if state.phase is UpdatePhase.COMMITTING else UpdatePhase.FAILED
    return state.model_copy(update={"phase": phase, "error": event.error})


def _on_boot(state: UpdateState, event: Booted) -> UpdateState:
    target = state.target
    switched = state.phase is UpdatePhase.SWITCHING and state.slot is not None and event.active_slot == state.slot
    if target is None or not (state.phase is UpdatePhase.COMMITTING or switched):
        return state
    boots = state.boots + 1
    if boots <= event.max_trial_boots:
        return state.model_copy(update={"phase": UpdatePhase.COMMITTING, "boots": boots})
    what = f"{target.name}:{target.version}"
    if event.previous is None:
        # Nothing to go back to: the trial model is the only one that passed a health check, so it keeps serving.
        message = f"agent started {boots} times while {what} was on trial; no previous model to roll back to"
        error = ErrorInfo.of(ErrorCode.HEALTH_CHECK_FAILED, message)
        return state.model_copy(update={"phase": UpdatePhase.FAILED, "boots": boots, "error": error})
    message = (
        f"agent started {boots} times while {what} was on trial (max_trial_boots = {event.max_trial_boots}); "
        f"rolled back to {event.previous.name}:{event.previous.version}"
    )
    error = ErrorInfo.of(ErrorCode.HEALTH_CHECK_FAILED, message)
    return state.model_copy(update={"phase": UpdatePhase.ROLLED_BACK, "boots": boots, "error": error})


def _on_restart(state: UpdateState, event: Restarted) -> UpdateState:
    target = state.target
    if target is None or not (state.in_progress or state.phase is UpdatePhase.ACTIVE):
        return state
    if state.phase is UpdatePhase.COMMITTING:
        return state  # `Booted` counted this start (or rolled back); the trial goes on
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
    if new.phase in (UpdatePhase.FAILED, UpdatePhase.ROLLED_BACK):
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
        case Booted():
            return _on_boot(state, event)
    raise TypeError(f"not an update event: {event!r}")
