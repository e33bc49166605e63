"""The documented statistics, checked against hand-computed values."""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest

from cloud.rollouts import (
    EmptyDataError,
    error_rate,
    jensen_shannon_divergence,
    p95_latency_ms,
    p95_ratio,
    population_stability_index,
    psi_band,
)
from protocol.telemetry import latency_histogram


def test_psi_matches_the_formula_by_hand() -> None:
    expected, actual = {"a": 60, "b": 40}, {"a": 40, "b": 60}
    # smoothing 0.5 over 2 classes: p = (60.5/101, 40.5/101), q = (40.5/101, 60.5/101)
    p, q = [60.5 / 101, 40.5 / 101], [40.5 / 101, 60.5 / 101]
    by_hand = sum((qi - pi) * math.log(qi / pi) for pi, qi in zip(p, q, strict=True))
    assert population_stability_index(expected, actual) == pytest.approx(by_hand)
    assert population_stability_index(expected, actual) == pytest.approx(population_stability_index(actual, expected))


def test_psi_of_identical_distributions_is_zero_up_to_smoothing() -> None:
    assert population_stability_index({"a": 100, "b": 300}, {"a": 100, "b": 300}) == 0.0
    # equal proportions, different sample sizes: only the smoothing term differs
    assert population_stability_index({"a": 10, "b": 30}, {"a": 100, "b": 300}) < 1e-3


def test_psi_stays_finite_when_a_class_is_missing_from_one_cohort() -> None:
    psi = population_stability_index({"a": 500, "b": 500}, {"a": 500, "b": 450, "c": 50})
    assert math.isfinite(psi)
    assert psi > 0


def test_psi_bands_follow_the_convention() -> None:
    assert [psi_band(v) for v in (0.05, 0.1, 0.25, 0.26)] == [
        "no shift",
        "moderate shift",
        "moderate shift",
        "major shift",
    ]


def test_jensen_shannon_is_zero_for_equal_one_for_disjoint_and_symmetric() -> None:
    assert jensen_shannon_divergence({"a": 1, "b": 3}, {"a": 2, "b": 6}) == pytest.approx(0.0)
    assert jensen_shannon_divergence({"a": 10}, {"b": 10}) == pytest.approx(1.0)
    x, y = {"a": 7, "b": 2, "c": 1}, {"a": 3, "b": 3, "c": 4}
    assert jensen_shannon_divergence(x, y) == pytest.approx(jensen_shannon_divergence(y, x))
    # by hand: P=(.5,.5), Q=(1,0) -> M=(.75,.25)
    by_hand = 0.5 * (0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(0.5 / 0.25)) + 0.5 * math.log2(1 / 0.75)
    assert jensen_shannon_divergence({"a": 1, "b": 1}, {"a": 5}) == pytest.approx(by_hand)


@pytest.mark.parametrize("statistic", [population_stability_index, jensen_shannon_divergence])
def test_shift_statistics_refuse_empty_data(statistic: Callable[[dict[str, int], dict[str, int]], float]) -> None:
    with pytest.raises(EmptyDataError):
        statistic({}, {"a": 3})
    with pytest.raises(EmptyDataError):
        statistic({"a": 3}, {"a": 0})
    with pytest.raises(ValueError, match="negative"):
        statistic({"a": -1, "b": 5}, {"a": 3})


def test_error_rate_and_its_edges() -> None:
    assert error_rate(5, 100) == 0.05
    with pytest.raises(EmptyDataError):
        error_rate(0, 0)
    with pytest.raises(ValueError, match="outside"):
        error_rate(11, 10)


def test_p95_from_histograms_is_the_bucket_upper_bound() -> None:
    fast = latency_histogram([1.0] * 95 + [40.0] * 5)
    assert p95_latency_ms([fast]) == 1.0
    slow = latency_histogram([1.0] * 90 + [40.0] * 10)
    assert p95_latency_ms([slow]) == 50.0
    assert p95_ratio(slow, fast) == 50.0
    assert p95_latency_ms([fast, slow]) == 50.0  # merged: 15 of 200 are slow
    with pytest.raises(EmptyDataError):
        p95_latency_ms([latency_histogram([])])


def test_p95_ratio_beyond_the_last_bucket() -> None:
    beyond = latency_histogram([10_000.0] * 10)
    normal = latency_histogram([5.0] * 10)
    assert p95_ratio(beyond, beyond) == 1.0
    assert p95_ratio(beyond, normal) == math.inf
    assert p95_ratio(normal, beyond) == 0.0
