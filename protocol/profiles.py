"""A version's reference profile: what its inputs and outputs look like on the data it was trained or evaluated on.

Built where the data is (`edgefleet compress` from its evaluation data, or `edgefleet profile` from a file of the
user's), pushed with the version, stored and signed with it (its digest is in the version's TUF target), and
compared on the coordinator with the sketches devices send (`protocol.sketches`): the same features, the same
sketch type, so a device's window and the reference merge and compare directly.

`calibration` is what estimates accuracy without labels (confidence-based performance estimation, as NannyML's
CBPE does): for ranges of the top-1 confidence, the share of reference predictions that were right, made
monotone. The expected accuracy of a window is the sum over ranges of (share of its predictions in the range) x
(the range's accuracy).
"""

from __future__ import annotations

import hashlib
import json

from pydantic import BaseModel, ConfigDict, Field, model_validator

from protocol.outputs import OutputSemantics
from protocol.sketches import WindowSketches

__all__ = ["PROFILE_FILE", "PROFILE_SCHEMA_VERSION", "CalibrationBin", "ReferenceProfile", "profile_digest"]

PROFILE_SCHEMA_VERSION = 1
PROFILE_FILE = "reference_profile.json"  # beside variants.json in a directory `edgefleet compress` writes
MAX_CALIBRATION_BINS = 100


class CalibrationBin(BaseModel):
    """Reference predictions whose top-1 confidence lies in `[low, high]`, and the share of them that were right."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    low: float = Field(ge=0.0, le=1.0)
    high: float = Field(ge=0.0, le=1.0)
    rows: int = Field(ge=1)
    accuracy: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _ordered(self) -> CalibrationBin:
        if self.low > self.high:
            raise ValueError(f"low {self.low} is above high {self.high}")
        return self


class ReferenceProfile(BaseModel):
    """Sketches of the reference data through the model, its class counts, accuracy and calibration."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    schema_version: int = PROFILE_SCHEMA_VERSION
    semantics: OutputSemantics
    rows: int = Field(ge=1)
    sketches: WindowSketches
    class_counts: dict[str, int] = Field(default_factory=dict)
    # Labelled accuracy on the reference data (classifiers with labels), None without labels.
    accuracy: float | None = Field(default=None, ge=0.0, le=1.0)
    calibration: list[CalibrationBin] = Field(default_factory=list, max_length=MAX_CALIBRATION_BINS)
    source: str = Field(default="", max_length=256)  # where the data came from, e.g. `digits (held-out)`

    @model_validator(mode="after")
    def _calibration_ordered(self) -> ReferenceProfile:
        for before, after in zip(self.calibration, self.calibration[1:], strict=False):
            if after.low < before.high - 1e-9:
                raise ValueError("calibration bins overlap or are out of order")
        return self


def profile_digest(profile: ReferenceProfile) -> str:
    """The sha256 of the profile's canonical JSON (what the version's signed target names)."""
    canonical = json.dumps(profile.model_dump(mode="json"), sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()
