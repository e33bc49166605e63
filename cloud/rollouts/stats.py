"""The statistics behind the rollout gates, with their formulas. Pure functions of counts.

Class-distribution shift (predicted classes of the updated cohort *a* against the control cohort *e*,
over the union of classes seen by either, K classes):

- **PSI**, population stability index, with additive smoothing s (default 0.5) so that a class absent
  from one cohort gives a finite term::

      p_i = (e_i + s) / (N_e + s·K)      q_i = (a_i + s) / (N_a + s·K)
      PSI = Σ_i (q_i - p_i) · ln(q_i / p_i)

  Reading (the credit-scoring convention): PSI < 0.1 no meaningful shift, 0.1-0.25 a moderate shift
  worth a look, > 0.25 a major shift. PSI is symmetric and unbounded.

- **Jensen-Shannon divergence**, base 2, on the raw proportions (no smoothing needed: the mixture M is
  positive wherever either distribution is)::

      M = (P + Q) / 2
      JSD = ½ Σ P_i log2(P_i / M_i) + ½ Σ Q_i log2(Q_i / M_i)      (0 ≤ JSD ≤ 1; terms with P_i = 0 are 0)

  0 means identical distributions, 1 means disjoint ones; its square root is a metric.

Error rate = errors / inferences. p95 latency comes from merged bucket histograms
(`protocol.telemetry`): it is the upper bound of the bucket holding the 95th percentile, so a ratio of
two p95s moves in bucket steps (…, 10, 15, 20, 30 ms, …), which is coarse but never flatters a
regression.

None of these functions decides anything: minimum sample rules live in `cloud.rollouts.gates`, which
reports *insufficient data* rather than pass or fail on too few samples. Functions given empty data
raise `EmptyDataError` instead of inventing a number.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence

from protocol.telemetry import histogram_quantile, merge_histograms

__all__ = [
    "DEFAULT_SMOOTHING",
    "EmptyDataError",
    "error_rate",
    "jensen_shannon_divergence",
    "p95_latency_ms",
    "p95_ratio",
    "population_stability_index",
    "psi_band",
]

DEFAULT_SMOOTHING = 0.5


class EmptyDataError(ValueError):
    """A statistic was asked of no data: the caller must wait for samples (retrying later helps)."""


def _classes(expected: Mapping[str, int], actual: Mapping[str, int]) -> list[str]:
    return sorted(set(expected) | set(actual))


def _check_counts(name: str, counts: Mapping[str, int]) -> int:
    if any(n < 0 for n in counts.values()):
        raise ValueError(f"{name} has a negative class count: {dict(counts)}")
    total = sum(counts.values())
    if total == 0:
        raise EmptyDataError(f"{name} has no predictions")
    return total


def population_stability_index(
    expected: Mapping[str, int], actual: Mapping[str, int], *, smoothing: float = DEFAULT_SMOOTHING
) -> float:
    """PSI of `actual` class counts against `expected` (see the module docstring for the formula)."""
    if smoothing <= 0:
        raise ValueError("smoothing must be positive, or an empty class makes PSI infinite")
    n_e, n_a = _check_counts("expected", expected), _check_counts("actual", actual)
    classes = _classes(expected, actual)
    k = len(classes)
    psi = 0.0
    for c in classes:
        p = (expected.get(c, 0) + smoothing) / (n_e + smoothing * k)
        q = (actual.get(c, 0) + smoothing) / (n_a + smoothing * k)
        psi += (q - p) * math.log(q / p)
    return psi


def psi_band(psi: float) -> str:
    """The conventional reading of a PSI value: `no shift`, `moderate shift` or `major shift`."""
    if psi < 0.1:
        return "no shift"
    return "moderate shift" if psi <= 0.25 else "major shift"


def jensen_shannon_divergence(expected: Mapping[str, int], actual: Mapping[str, int]) -> float:
    """Jensen-Shannon divergence, base 2 (0..1), between two class-count distributions."""
    n_e, n_a = _check_counts("expected", expected), _check_counts("actual", actual)
    divergence = 0.0
    for c in _classes(expected, actual):
        p, q = expected.get(c, 0) / n_e, actual.get(c, 0) / n_a
        m = (p + q) / 2
        if p > 0:
            divergence += 0.5 * p * math.log2(p / m)
        if q > 0:
            divergence += 0.5 * q * math.log2(q / m)
    return min(max(divergence, 0.0), 1.0)  # clamp float noise


def error_rate(errors: int, inferences: int) -> float:
    """errors / inferences; `EmptyDataError` when there were no inferences."""
    if inferences <= 0:
        raise EmptyDataError("no inferences")
    if not 0 <= errors <= inferences:
        raise ValueError(f"error count {errors} is outside 0..{inferences}")
    return errors / inferences


def p95_latency_ms(histograms: Iterable[Sequence[int]]) -> float:
    """p95 (ms, bucket upper bound) of the merged latency histograms; `EmptyDataError` if all empty."""
    value = histogram_quantile(merge_histograms(histograms), 0.95)
    if value is None:
        raise EmptyDataError("empty latency histogram")
    return value


def p95_ratio(candidate: Sequence[int], baseline: Sequence[int]) -> float:
    """p95 of `candidate` / p95 of `baseline`; both above the last bucket counts as 1, only one as inf."""
    a, b = p95_latency_ms([candidate]), p95_latency_ms([baseline])
    if math.isinf(b):
        return 1.0 if math.isinf(a) else a / b
    return a / b
