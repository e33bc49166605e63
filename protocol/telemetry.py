"""Latency histograms shared by agents (which fill them) and the coordinator (which merges them)."""

from __future__ import annotations

import bisect
from collections.abc import Iterable, Sequence

# Upper bounds (ms) of the latency buckets; one extra bucket counts everything above the last bound.
LATENCY_BUCKETS_MS: tuple[float, ...] = (
    0.05,
    0.1,
    0.2,
    0.3,
    0.5,
    0.75,
    1,
    1.5,
    2,
    3,
    5,
    7.5,
    10,
    15,
    20,
    30,
    50,
    75,
    100,
    150,
    200,
    300,
    500,
    750,
    1000,
    2000,
    5000,
)


def latency_histogram(latencies_ms: Iterable[float]) -> list[int]:
    """Count latencies into `LATENCY_BUCKETS_MS` buckets (a value equal to a bound falls in that bucket)."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for value in latencies_ms:
        counts[bisect.bisect_left(LATENCY_BUCKETS_MS, value)] += 1
    return counts


def merge_histograms(histograms: Iterable[Sequence[int]]) -> list[int]:
    """Add histograms bucket by bucket; histograms of another length are ignored."""
    total = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    for hist in histograms:
        if len(hist) == len(total):
            total = [a + b for a, b in zip(total, hist, strict=True)]
    return total


def histogram_quantile(histogram: Sequence[int], q: float) -> float | None:
    """Upper bound (ms) of the bucket holding quantile `q` (0..1); None for an empty histogram."""
    count = sum(histogram)
    if count == 0:
        return None
    rank = q * count
    seen = 0
    for index, n in enumerate(histogram):
        seen += n
        if seen >= rank and n:
            return LATENCY_BUCKETS_MS[index] if index < len(LATENCY_BUCKETS_MS) else float("inf")
    return float("inf")
