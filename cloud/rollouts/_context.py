"""The working set of one `step`: a private copy of the state, the plan, the time and what was decided."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from cloud.rollouts.actions import Action
from cloud.rollouts.decisions import Decision
from cloud.rollouts.plan import RolloutPlan
from cloud.rollouts.state import RolloutState

__all__ = ["StepContext"]


@dataclass
class StepContext:
    """Mutable scratch space of one step; `state` is a deep copy, so the caller's state is never touched."""

    state: RolloutState
    plan: RolloutPlan
    now: datetime
    actions: list[Action] = field(default_factory=list)
    decisions: list[Decision] = field(default_factory=list)

    def decide(self, kind: type[Any], message: str, **fields: Any) -> None:
        """Record a decision of type `kind`, stamped with the step's time."""
        self.decisions.append(kind(at=self.now, message=message, **fields))
