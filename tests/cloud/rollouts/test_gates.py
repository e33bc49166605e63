"""Gate verdicts: pass, fail with the figures, or refuse to decide on too little data."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from cloud.rollouts import CohortStats, GateThresholds, GateVerdict, control_mismatch, evaluate_gates
from protocol.messages import TelemetryWindow
from protocol.telemetry import latency_histogram
from tests.cloud.rollouts.sim import T0, cohort

ONLY = {
    "max_install_failure_rate": None,
    "max_error_rate": None,
    "max_error_rate_increase": None,
    "max_p95_ms": None,
    "max_p95_latency_ratio": None,
    "max_psi": None,
    "max_js_divergence": None,
}


def only(**gate: object) -> GateThresholds:
    """Thresholds with just the given gates enabled."""
    return GateThresholds.model_validate({**ONLY, **gate})


def verdict(gates: GateThresholds, wave: CohortStats, control: CohortStats) -> tuple[GateVerdict, str]:
    (result,) = evaluate_gates(gates, wave, control).results
    return result.verdict, result.reason


def test_healthy_wave_passes_every_default_gate() -> None:
    wave = cohort().model_copy(update={"install_attempts": 10, "install_failures": 0})
    report = evaluate_gates(GateThresholds(), wave, cohort())
    assert [r.name for r in report.results] == [
        "install_failure_rate",
        "error_rate_increase",
        "p95_latency_ratio",
        "class_shift_psi",
    ]
    assert report.passed, report.summary()


def test_latency_regression_trips_p95_gate() -> None:
    gates = only(max_p95_latency_ratio=1.25)
    result = evaluate_gates(gates, cohort(latency_ms=12.0), cohort(latency_ms=4.0)).results[0]
    assert result.verdict is GateVerdict.FAILED
    assert result.observed == pytest.approx(15.0 / 5.0)  # bucket bounds: 12 ms -> 15, 4 ms -> 5
    assert result.threshold == 1.25
    assert "p95 15 ms vs control 5 ms" in result.reason


def test_p95_within_one_bucket_passes() -> None:
    assert verdict(only(max_p95_latency_ratio=1.25), cohort(latency_ms=4.5), cohort(latency_ms=4.0))[0] is (
        GateVerdict.PASSED
    )


def test_psi_refuses_to_decide_below_minimum_samples() -> None:
    gates = only(max_psi=0.1, min_class_samples=500)
    shifted = cohort(classes={"0": 400, "1": 10})  # 410 predictions: a major shift, but too few to say
    result = evaluate_gates(gates, shifted, cohort()).results[0]
    assert result.verdict is GateVerdict.INSUFFICIENT_DATA
    assert result.observed is None
    assert "updated cohort has 410 predictions, needs 500" in result.reason
    # the control cohort counts too
    assert verdict(gates, cohort(), cohort(classes={"0": 20}))[0] is GateVerdict.INSUFFICIENT_DATA
    # with enough samples the same shift fails
    enough = cohort(classes={"0": 900, "1": 100})
    assert verdict(gates, enough, cohort())[0] is GateVerdict.FAILED


def test_class_shift_fails_the_psi_gate_with_its_band() -> None:
    v, reason = verdict(only(max_psi=0.25), cohort(classes={"0": 600, "1": 400}), cohort())
    assert v is GateVerdict.FAILED
    assert "major shift" in reason


def test_js_gate_fails_on_a_shift_and_passes_on_the_same_distribution() -> None:
    gates = only(max_js_divergence=0.05)
    assert verdict(gates, cohort(classes={"0": 900, "1": 100}), cohort())[0] is GateVerdict.FAILED
    assert verdict(gates, cohort(), cohort())[0] is GateVerdict.PASSED


def test_error_rate_increase_over_control_fails() -> None:
    gates = only(max_error_rate_increase=0.01)
    v, reason = verdict(gates, cohort(errors=30), cohort(errors=5))  # 3.0 % vs 0.5 %
    assert v is GateVerdict.FAILED
    assert "error rate 3.00% vs control 0.50%" in reason
    assert verdict(gates, cohort(errors=12), cohort(errors=5))[0] is GateVerdict.PASSED


def test_error_gate_needs_minimum_inferences_in_both_cohorts() -> None:
    gates = only(max_error_rate_increase=0.01, min_inferences=200)
    v, reason = verdict(gates, cohort(n=100, errors=50), cohort())
    assert v is GateVerdict.INSUFFICIENT_DATA
    assert "100 inferences, needs 200" in reason


def test_install_failure_rate_gate() -> None:
    gates = only(max_install_failure_rate=0.1)
    bad = CohortStats(install_attempts=10, install_failures=2)
    v, reason = verdict(gates, bad, CohortStats())
    assert v is GateVerdict.FAILED
    assert "2 of 10 installs failed" in reason
    assert verdict(gates, CohortStats(install_attempts=10, install_failures=1), CohortStats())[0] is GateVerdict.PASSED
    assert verdict(gates, CohortStats(), CohortStats())[0] is GateVerdict.INSUFFICIENT_DATA


def test_disabled_gates_are_not_reported_and_no_gates_pass() -> None:
    report = evaluate_gates(only(), cohort(errors=999), cohort())
    assert report.results == []
    assert report.passed


def test_cohort_stats_refuse_inconsistent_figures() -> None:
    with pytest.raises(ValidationError, match="install_failures 3 exceed install_attempts 2"):
        CohortStats(install_attempts=2, install_failures=3)
    with pytest.raises(ValidationError, match="error_count"):
        CohortStats(inference_count=1, error_count=2)
    with pytest.raises(ValidationError, match="buckets"):
        CohortStats(latency_histogram=[1, 2, 3])


def test_cohort_stats_sum_telemetry_windows() -> None:
    windows = [
        TelemetryWindow(
            device_id=device,
            seq=seq,
            window_start=T0,
            window_end=T0,
            inference_count=10,
            error_count=1,
            latency_histogram=latency_histogram([2.0] * 10),
            class_counts={"3": 6, "7": 4},
        )
        for device in ("a", "b")
        for seq in (1, 2)
    ]
    stats = CohortStats.from_windows(windows)
    assert (stats.devices, stats.inference_count, stats.error_count) == (2, 40, 4)
    assert stats.class_counts == {"3": 24, "7": 16}
    assert stats.latency_samples == 40


# --- a new model: absolute limits instead of a control cohort -----------------------------------------------------

NOTHING = CohortStats()  # a control cohort on another model, or none: not one inference of ours


def test_absolute_baseline_reports_comparisons_as_not_applicable_and_passes_on_its_limits() -> None:
    gates = GateThresholds(max_error_rate=0.01, max_p95_ms=50, min_inferences=20, min_class_samples=20)
    wave = cohort(n=100, latency_ms=4.0).model_copy(update={"install_attempts": 2})
    report = evaluate_gates(gates, wave, NOTHING, baseline="absolute")
    verdicts = {r.name: r.verdict for r in report.results}
    assert verdicts == {
        "install_failure_rate": GateVerdict.PASSED,
        "error_rate": GateVerdict.PASSED,
        "error_rate_increase": GateVerdict.NOT_APPLICABLE,
        "p95_latency_ms": GateVerdict.PASSED,
        "p95_latency_ratio": GateVerdict.NOT_APPLICABLE,
        "class_shift_psi": GateVerdict.NOT_APPLICABLE,
    }
    assert report.passed and not report.undecided, report.summary()
    psi = next(r for r in report.results if r.name == "class_shift_psi")
    assert psi.reason == "baseline is absolute: no control cohort to compare with"


def test_the_same_empty_control_cohort_leaves_comparative_gates_waiting_under_a_control_baseline() -> None:
    report = evaluate_gates(GateThresholds(min_inferences=20), cohort(n=100), NOTHING, baseline="control")
    assert not report.passed
    assert "control cohort has 0 inferences, needs 20" in report.summary()


def test_absolute_error_rate_above_its_limit_fails_with_the_figures() -> None:
    v, reason = verdict(only(max_error_rate=0.01), cohort(n=1000, errors=30), NOTHING)
    assert v is GateVerdict.FAILED
    assert reason == "0.03 > 0.01 (30 errors in 1000 inferences)"


def test_absolute_p95_limit_fails_a_slow_cohort_and_needs_only_the_updated_cohorts_samples() -> None:
    gates = only(max_p95_ms=50.0, min_inferences=200)
    v, reason = verdict(gates, cohort(latency_ms=80.0), NOTHING)
    assert v is GateVerdict.FAILED and "> 50" in reason
    assert verdict(gates, cohort(latency_ms=8.0), NOTHING)[0] is GateVerdict.PASSED
    v, reason = verdict(gates, cohort(n=50), NOTHING)
    assert v is GateVerdict.INSUFFICIENT_DATA and reason == "updated cohort has 50 latency samples, needs 200"


def test_control_cohort_short_of_data_says_what_its_devices_serve() -> None:
    control = CohortStats(devices=6, runs={"mnist:1.0": 4, "none": 2})
    v, reason = verdict(only(max_psi=0.25, min_class_samples=20), cohort(), control)
    assert v is GateVerdict.INSUFFICIENT_DATA
    assert reason == (
        "control cohort has 0 predictions, needs 20 (its devices serve mnist:1.0 on 4 devices, no model on 2 devices)"
    )


@pytest.mark.parametrize(
    ("runs", "previous", "expected"),
    [
        ({"mnist:1.0": 4, "none": 2}, "1.0", "serves mnist:1.0 on 4 devices, no model on 2 devices, not digits:1.0"),
        ({"digits:0.9": 3}, "1.0", "serves digits:0.9 on 3 devices, not digits:1.0"),
        ({"none": 1}, None, "serves no model on 1 device, not digits (a version other than 2.0)"),
        ({"digits:1.0": 3, "mnist:1.0": 1}, "1.0", None),  # some of it serves the previous version: usable
        ({"digits:0.9": 3}, None, None),  # no previous version named: any other version of the model compares
        ({}, "1.0", None),  # what the devices serve is unknown: nothing to say
    ],
)
def test_control_cohort_on_another_model_is_named(
    runs: dict[str, int], previous: str | None, expected: str | None
) -> None:
    why = control_mismatch(
        CohortStats(devices=sum(runs.values()) or 1, runs=runs), model="digits", version=previous, target="2.0"
    )
    if expected is None:
        assert why is None
    else:
        assert why is not None and why.endswith(expected), why


def test_an_empty_control_cohort_is_named_as_missing() -> None:
    why = control_mismatch(CohortStats(), model="digits", version="1.0", target="2.0")
    assert why == "there is no control cohort: no selected device was seen untouched, serving digits:1.0"
