"""The update path: a pure state machine (`machine`), its persisted state, the slots and the IO steps."""

from agent.update.cancel import StepCancelledError
from agent.update.executor import UpdateExecutor, load_model
from agent.update.fetch import ArtifactFetcher
from agent.update.health import HealthPolicy, ShadowSample, check_outputs, compare_outputs, shadow_verdict
from agent.update.hooks import UpdateHooks
from agent.update.machine import (
    NEXT_PHASE,
    Booted,
    DesiredReceived,
    Event,
    Restarted,
    StepFailed,
    StepSucceeded,
    handle,
    other_slot,
    transition_event,
)
from agent.update.slots import SlotContent, SlotStore
from agent.update.state import FORMAT_VERSION, IN_PROGRESS, StateFile, UpdateState
from agent.update.worker import UpdateWorker

__all__ = [
    "FORMAT_VERSION",
    "IN_PROGRESS",
    "NEXT_PHASE",
    "ArtifactFetcher",
    "Booted",
    "DesiredReceived",
    "Event",
    "HealthPolicy",
    "Restarted",
    "ShadowSample",
    "SlotContent",
    "SlotStore",
    "StateFile",
    "StepCancelledError",
    "StepFailed",
    "StepSucceeded",
    "UpdateExecutor",
    "UpdateHooks",
    "UpdateState",
    "UpdateWorker",
    "check_outputs",
    "compare_outputs",
    "handle",
    "load_model",
    "other_slot",
    "shadow_verdict",
    "transition_event",
]
