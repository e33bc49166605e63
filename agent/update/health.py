"""The health check's decisions, pure: are warm-up outputs healthy, how far a shadow run strays, the verdict.

The IO around them (running the warm-up inference, mirroring live requests to the candidate) lives in
`agent.update.shadow` and the executor; everything here takes arrays and numbers and returns reasons.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from agent.runtime import numpy_dtype
from agent.runtime._tensors import shape_fits
from protocol import TensorSpec

__all__ = ["HealthPolicy", "ShadowSample", "check_outputs", "compare_outputs", "shadow_verdict"]


@dataclass(frozen=True)
class HealthPolicy:
    """How strict the update path is before and after the switch (from `AgentConfig`)."""

    shadow_inferences: int = 0  # live requests the candidate shadows before the switch; 0 = no shadow run
    shadow_max_disagreement: float = 0.05  # share of rows whose argmax may differ from the serving model's
    shadow_max_abs_diff: float | None = None  # largest |candidate - serving| output difference
    shadow_max_latency_ratio: float | None = None  # candidate median latency / serving median latency
    shadow_timeout_s: float = 300.0  # how long a shadow run waits for live requests
    shadow_on_timeout: Literal["pass", "fail"] = "pass"
    commit_after_s: float = 5.0  # trial time after the switch before the commit
    commit_after_inferences: int = 0  # or commit after this many successful inferences; 0 = time only
    max_trial_boots: int = 3  # agent starts tolerated during a trial; one more rolls back


def check_outputs(declared: Sequence[TensorSpec], outputs: Mapping[str, np.ndarray]) -> str | None:
    """Why warm-up `outputs` are unhealthy (missing, wrong shape or datatype, NaN/Inf), or None when healthy."""
    for spec in declared:
        if spec.name not in outputs:
            return f"output {spec.name!r} is declared but the model returned only {sorted(outputs)}"
        array = np.asarray(outputs[spec.name])
        if array.dtype != numpy_dtype(spec.datatype):
            return f"output {spec.name!r} is {array.dtype}, declared {spec.datatype.value}"
        if not shape_fits(spec.shape, array.shape):
            return f"output {spec.name!r} has shape {list(array.shape)}, declared {spec.shape} (-1 = any)"
    for name, value in outputs.items():
        array = np.asarray(value)
        if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
            return f"output {name!r} is not finite (NaN or Inf)"
    return None


@dataclass(frozen=True)
class ShadowSample:
    """One live request answered by both models: how far the candidate strayed, and both latencies."""

    rows: int
    disagreeing_rows: int
    max_abs_diff: float
    serving_ms: float
    candidate_ms: float


def _argmax_rows(array: np.ndarray) -> np.ndarray | None:
    if array.ndim == 0 or array.shape[-1] < 2:
        return None  # not class scores: only the absolute difference applies
    return np.asarray(array.argmax(axis=-1)).reshape(-1)


def compare_outputs(
    serving: Mapping[str, np.ndarray],
    candidate: Mapping[str, np.ndarray],
    *,
    serving_ms: float,
    candidate_ms: float,
) -> ShadowSample:
    """Compare both models' answers to one request (outputs paired by name, else the first of each)."""
    pairs = [(serving[n], candidate[n]) for n in candidate if n in serving]
    if not pairs and serving and candidate:
        pairs = [(next(iter(serving.values())), next(iter(candidate.values())))]
    if not pairs:
        return ShadowSample(1, 1, float("inf"), serving_ms, candidate_ms)
    max_diff = 0.0
    for a, b in pairs:
        a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
        if a.shape != b.shape or not np.all(np.isfinite(b)):
            rows = int(np.prod(a.shape[:-1])) if a.ndim > 1 else 1
            return ShadowSample(rows, rows, float("inf"), serving_ms, candidate_ms)
        max_diff = max(max_diff, float(np.max(np.abs(a - b))) if a.size else 0.0)
    first_a, first_b = (np.asarray(x) for x in pairs[0])
    rows_a, rows_b = _argmax_rows(first_a), _argmax_rows(first_b)
    if rows_a is None or rows_b is None:
        return ShadowSample(1, 0, max_diff, serving_ms, candidate_ms)
    return ShadowSample(len(rows_a), int(np.sum(rows_a != rows_b)), max_diff, serving_ms, candidate_ms)


def shadow_verdict(samples: Sequence[ShadowSample], policy: HealthPolicy, *, timed_out: bool) -> str | None:
    """Why the candidate must not be switched to, or None. `timed_out`: the run saw fewer requests than wanted."""
    wanted = policy.shadow_inferences
    if timed_out and policy.shadow_on_timeout == "fail":
        return (
            f"shadow run saw {len(samples)} of {wanted} live requests within {policy.shadow_timeout_s:g}s "
            f"(shadow_on_timeout = fail)"
        )
    if not samples:
        return None
    rows = sum(s.rows for s in samples)
    disagreeing = sum(s.disagreeing_rows for s in samples)
    share = disagreeing / rows if rows else 0.0
    if share > policy.shadow_max_disagreement:
        return (
            f"candidate disagrees with the serving model on {disagreeing} of {rows} shadowed rows "
            f"({share:.1%} > {policy.shadow_max_disagreement:.1%})"
        )
    worst = max(s.max_abs_diff for s in samples)
    if policy.shadow_max_abs_diff is not None and worst > policy.shadow_max_abs_diff:
        return f"candidate outputs differ by up to {worst:.4g} (> {policy.shadow_max_abs_diff:g}) on live requests"
    if policy.shadow_max_latency_ratio is not None:
        serving = float(np.median([s.serving_ms for s in samples]))
        candidate = float(np.median([s.candidate_ms for s in samples]))
        if candidate > policy.shadow_max_latency_ratio * max(serving, 1e-3):
            return (
                f"candidate median latency {candidate:.2f} ms is more than {policy.shadow_max_latency_ratio:g}x "
                f"the serving model's {serving:.2f} ms"
            )
    return None
