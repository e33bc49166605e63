"""The update path: a pure state machine (`machine`), its persisted state, the slots and the IO steps."""

from agent.update.executor import UpdateExecutor, load_model
from agent.update.fetch import ArtifactFetcher
from agent.update.machine import (
    NEXT_PHASE,
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
    "DesiredReceived",
    "Event",
    "Restarted",
    "SlotContent",
    "SlotStore",
    "StateFile",
    "StepFailed",
    "StepSucceeded",
    "UpdateExecutor",
    "UpdateState",
    "UpdateWorker",
    "handle",
    "load_model",
    "other_slot",
    "transition_event",
]
