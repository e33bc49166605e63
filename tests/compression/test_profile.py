"""Reference profiles: the model over reference data, sketched as devices sketch, with accuracy and calibration."""

from __future__ import annotations

import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from compression.data import Dataset, load_dataset
from compression.errors import InvalidInputError
from compression.profile import build_profile, calibration_bins
from protocol.profiles import PROFILE_FILE, ReferenceProfile, profile_digest
from protocol.sketches import SketchSet


def test_profile_of_the_digits_classifier_measures_accuracy_and_calibrates_confidence(
    digits_model_path: Path,
) -> None:
    data = load_dataset("digits")
    profile = build_profile(digits_model_path, data, source="digits")
    assert profile.rows == len(data) and profile.semantics.kind == "classifier"
    assert profile.sketches.feature_mode == "chunk-means" and len(profile.sketches.features) == 8  # 64 pixels
    assert sum(profile.class_counts.values()) == len(data)
    assert profile.accuracy is not None and 0.9 < profile.accuracy <= 1.0
    accuracies = [b.accuracy for b in profile.calibration]
    assert accuracies == sorted(accuracies), "isotonic calibration never falls as confidence rises"
    assert sum(b.rows for b in profile.calibration) == len(data)
    # The profile round-trips through its JSON form with the same digest (what gets signed).
    again = ReferenceProfile.model_validate_json(profile.model_dump_json())
    assert profile_digest(again) == profile_digest(profile)
    assert SketchSet.from_wire(again.sketches).rows == len(data)


def test_unlabelled_data_gives_a_profile_without_accuracy(digits_model_path: Path) -> None:
    data = load_dataset("digits")
    profile = build_profile(digits_model_path, Dataset(data.x, None, "inputs only"))
    assert profile.accuracy is None and profile.calibration == []
    assert profile.class_counts  # predicted classes are counted all the same


def test_data_of_the_wrong_shape_is_refused_with_the_reason(digits_model_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="values"):
        build_profile(digits_model_path, Dataset(np.zeros((10, 5), dtype=np.float32), None, "narrow"))


def test_calibration_bins_cover_every_row_and_rise_with_confidence() -> None:
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.3, 1.0, 2000)
    correct = rng.uniform(size=2000) < confidence  # right as often as it is confident
    bins = calibration_bins(confidence, correct, bins=10)
    assert len(bins) == 10 and sum(b.rows for b in bins) == 2000
    assert bins[0].accuracy < 0.55 and bins[-1].accuracy > 0.9
    assert all(a.high <= b.low + 1e-12 for a, b in itertools.pairwise(bins))


def test_edgefleet_profile_command_writes_a_profile(digits_model_path: Path, tmp_path: Path) -> None:
    out = tmp_path / PROFILE_FILE
    done = subprocess.run(
        [
            str(Path(sys.executable).parent / "edgefleet"),
            "profile",
            str(digits_model_path),
            "--data",
            "digits",
            "-o",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "450 rows" in done.stdout and "classifier" in done.stdout
    assert ReferenceProfile.model_validate(json.loads(out.read_text())).rows == 450
