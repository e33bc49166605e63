"""The simulator's traffic generator: held-out digits drawn with their real class mix, and drift on chosen cohorts.

The class-shift gate is evaluated on what the real digits model (in ONNX Runtime) predicts for the traffic:
a rotated or inverted cohort trips it, two clean cohorts do not.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import onnxruntime
import pytest

from cloud.rollouts import CohortStats, GateThresholds, GateVerdict, evaluate_gates
from compression.reference import load_digits_split
from simulators import SampleSource, parse_drift
from simulators.drift import Drift, drifts_for

SHAPE = [-1, 64]
PSI_ONLY = GateThresholds(
    max_install_failure_rate=None,
    max_error_rate_increase=None,
    max_p95_latency_ratio=None,
    max_psi=0.25,
    min_class_samples=400,
)


def predicted_classes(model: bytes, source: SampleSource, n: int) -> CohortStats:
    """What the digits model predicts for `n` requests of `source`, as a cohort's class counts."""
    session = onnxruntime.InferenceSession(model)
    rows = np.stack([source.draw()[0] for _ in range(n)])
    predicted = session.run(None, {"input": rows})[0].argmax(axis=1)
    return CohortStats(devices=1, class_counts={str(k): int(v) for k, v in Counter(predicted.tolist()).items()})


def test_traffic_follows_the_held_out_class_mix_rather_than_one_sample() -> None:
    source = SampleSource(SHAPE, seed=1)
    draws = [source.draw() for _ in range(4000)]
    labels = Counter(label for _, label in draws)
    held_out = Counter(load_digits_split().y_test.tolist())
    total = sum(held_out.values())
    for digit, count in held_out.items():
        assert labels[digit] / len(draws) == pytest.approx(count / total, abs=0.025), (digit, labels)
    distinct = {sample.tobytes() for sample, _ in draws}
    assert len(distinct) > 0.8 * total, "requests draw rows across the whole held-out split"
    assert draws[0][0].shape == (64,) and draws[0][0].dtype == np.float32


def test_drift_applies_only_to_devices_whose_tags_match() -> None:
    drifts = [parse_drift("rotate:site=b"), parse_drift("noise=0.4:ring=canary,site=b")]
    assert drifts_for(drifts, {"site": "a", "ring": "canary"}) == []
    assert drifts_for(drifts, {"site": "b", "ring": "main"}) == drifts[:1]
    assert drifts_for(drifts, {"site": "b", "ring": "canary"}) == drifts
    clean, turned = SampleSource(SHAPE, seed=7), SampleSource(SHAPE, drifts=drifts[:1], seed=7)
    for _ in range(20):
        (a, label_a), (b, label_b) = clean.draw(), turned.draw()
        assert label_a == label_b
        assert np.array_equal(np.rot90(a.reshape(8, 8)).ravel(), b)


def test_noise_and_inversion_keep_pixels_in_range() -> None:
    rows = load_digits_split().x_test[:50]
    rng = np.random.default_rng(0)
    noisy = parse_drift("noise=0.5").apply(rows, rng)
    assert noisy.min() >= 0.0 and noisy.max() <= 1.0 and not np.allclose(noisy, rows)
    assert np.allclose(parse_drift("invert").apply(rows, rng), 1.0 - rows)


@pytest.mark.parametrize("drift", ["rotate", "rotate=270", "invert"])  # a half turn is milder: 0, 1, 8 survive it
def test_drifted_cohort_trips_the_class_shift_gate_and_a_clean_one_does_not(
    digits_model_bytes: bytes, drift: str
) -> None:
    control = predicted_classes(digits_model_bytes, SampleSource(SHAPE, seed=1), 600)
    clean = predicted_classes(digits_model_bytes, SampleSource(SHAPE, seed=2), 600)
    drifted = predicted_classes(digits_model_bytes, SampleSource(SHAPE, drifts=[parse_drift(drift)], seed=3), 600)
    (same,) = evaluate_gates(PSI_ONLY, clean, control).results
    assert same.verdict is GateVerdict.PASSED, same.reason
    (shifted,) = evaluate_gates(PSI_ONLY, drifted, control).results
    assert shifted.verdict is GateVerdict.FAILED, shifted.reason
    assert "major shift" in shifted.reason


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("spin:site=b", "unknown kind 'spin'; one of rotate, noise, invert"),
        ("rotate=45", "rotate by a multiple of 90 degrees"),
        ("noise=-1", "noise needs a positive standard deviation"),
        ("noise=lots", "'lots' is not a number"),
        ("invert=2", "invert takes no amount"),
        ("rotate:site", "'site' is not TAG=VALUE"),
    ],
)
def test_bad_drift_is_refused_with_a_message_naming_it(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_drift(text)


def test_drift_reads_back_as_written() -> None:
    assert parse_drift("rotate:site=b") == Drift("rotate", 90.0, {"site": "b"})
    assert parse_drift("noise=0.5:ring=canary").describe() == "noise=0.5 on ring=canary"
    assert parse_drift("invert").describe() == "invert on every device"
