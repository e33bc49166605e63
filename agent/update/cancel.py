"""`StepCancelledError`: a step of the update path stopped on purpose, to be resumed; never a failure."""

from __future__ import annotations

__all__ = ["StepCancelledError"]


class StepCancelledError(Exception):
    """The step was abandoned on purpose (agent stopping, or a newer desired state); the state stays resumable."""
