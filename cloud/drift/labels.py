"""Labels fed back by local applications, summed per cohort, and the labelled accuracy they give. Pure.

A window carries `protocol.messages.LabelCounts` (labels that arrived in it: how many, how many the model had
right, per true class, and a regressor's summed absolute error); they add up per rollup and per cohort.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from protocol.messages import LabelCounts

__all__ = ["LabelSums", "LabelledAccuracy", "labelled_accuracy"]

log = logging.getLogger(__name__)


@dataclass
class LabelSums:
    """Sums of windows' `LabelCounts`."""

    labelled: int = 0
    correct: int = 0
    abs_error_sum: float = 0.0
    by_class: dict[str, list[int]] = field(default_factory=dict)

    def add(self, raw: Mapping[str, Any] | None) -> bool:
        """Add stored label counts (a window's or a rollup's); False (nothing added) when they are not valid."""
        if not raw:
            return True
        try:
            counts = LabelCounts.model_validate(raw)
        except ValidationError as exc:
            log.warning("drift: label counts skipped: %s", exc)
            return False
        self.labelled += counts.labelled
        self.correct += counts.correct
        self.abs_error_sum += counts.abs_error_sum
        for name, (labelled, correct) in counts.by_class.items():
            pair = self.by_class.setdefault(name, [0, 0])
            pair[0] += labelled
            pair[1] += correct
        return True

    def merge(self, other: LabelSums) -> None:
        """Add another sum."""
        self.add(other.to_json())

    def to_json(self) -> dict[str, Any] | None:
        """The stored form (`LabelCounts`' fields); None when no label arrived."""
        if not self.labelled and not self.by_class:
            return None
        return {
            "labelled": self.labelled,
            "correct": self.correct,
            "abs_error_sum": self.abs_error_sum,
            "by_class": {k: list(v) for k, v in sorted(self.by_class.items())},
        }


@dataclass(frozen=True)
class LabelledAccuracy:
    """A cohort's labelled accuracy (classifiers) or mean absolute error (regressors), or why there is none."""

    labelled: int
    accuracy: float | None
    mae: float | None
    reason: str | None  # set when `accuracy` and `mae` are None
    reference: float | None = None  # the labelled accuracy on the reference data (the profile's)

    @property
    def drop(self) -> float | None:
        """Reference minus labelled accuracy (positive: worse than the reference)."""
        if self.accuracy is None or self.reference is None:
            return None
        return self.reference - self.accuracy


def labelled_accuracy(
    sums: LabelSums, *, regressor: bool, min_labels: int, reference: float | None = None
) -> LabelledAccuracy:
    """correct / labelled (or MAE for a regressor) once at least `min_labels` labels arrived; else the reason."""
    if sums.labelled < min_labels:
        reason = f"{sums.labelled} labels fed back, fewer than the {min_labels} labelled accuracy needs"
        return LabelledAccuracy(sums.labelled, accuracy=None, mae=None, reason=reason, reference=reference)
    if regressor:
        mae = sums.abs_error_sum / sums.labelled
        return LabelledAccuracy(sums.labelled, accuracy=None, mae=mae, reason=None, reference=reference)
    accuracy = sums.correct / sums.labelled
    return LabelledAccuracy(sums.labelled, accuracy=accuracy, mae=None, reason=None, reference=reference)
