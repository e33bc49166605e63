"""The health check's pure decisions: warm-up outputs, shadow comparisons and the shadow verdict."""

from __future__ import annotations

import numpy as np
import pytest

from agent.update import HealthPolicy, ShadowSample, check_outputs, compare_outputs, shadow_verdict
from protocol import TensorSpec

DECLARED = [TensorSpec(name="probabilities", datatype="FP32", shape=[-1, 10])]
GOOD = np.full((1, 10), 0.1, np.float32)


@pytest.mark.parametrize(
    ("outputs", "problem"),
    [
        ({"probabilities": GOOD}, None),
        ({"probabilities": np.full((3, 10), 0.1, np.float32)}, None),  # dynamic batch
        ({"probabilities": np.full((1, 9), 0.1, np.float32)}, "shape [1, 9]"),
        ({"probabilities": GOOD.astype(np.float64)}, "float64, declared FP32"),
        ({"logits": GOOD}, "declared but the model returned only ['logits']"),
        ({"probabilities": np.where(np.arange(10) == 3, np.nan, 0.1).astype(np.float32)[None]}, "not finite"),
        ({"probabilities": GOOD, "extra": np.array([np.inf], np.float32)}, "'extra' is not finite"),
    ],
    ids=["healthy", "dynamic_batch", "wrong_shape", "wrong_datatype", "missing_output", "nan", "inf_in_extra"],
)
def test_warm_up_outputs(outputs: dict[str, np.ndarray], problem: str | None) -> None:
    found = check_outputs(DECLARED, outputs)
    assert found is None if problem is None else problem in str(found)


def sample(disagree: int = 0, diff: float = 0.0, serving_ms: float = 1.0, candidate_ms: float = 1.0) -> ShadowSample:
    return ShadowSample(
        rows=10, disagreeing_rows=disagree, max_abs_diff=diff, serving_ms=serving_ms, candidate_ms=candidate_ms
    )


def test_compare_counts_rows_whose_argmax_differs_and_the_largest_difference() -> None:
    serving = np.eye(10, dtype=np.float32)[[0, 1, 2, 3]]
    candidate = np.eye(10, dtype=np.float32)[[0, 1, 2, 4]]
    s = compare_outputs({"p": serving}, {"p": candidate}, serving_ms=1.0, candidate_ms=2.0)
    assert (s.rows, s.disagreeing_rows, s.max_abs_diff) == (4, 1, 1.0)


def test_compare_pairs_first_outputs_when_names_differ_and_flags_nan_as_total_disagreement() -> None:
    same = compare_outputs({"a": GOOD}, {"b": GOOD}, serving_ms=1, candidate_ms=1)
    assert (same.disagreeing_rows, same.max_abs_diff) == (0, 0.0)
    nan = compare_outputs({"a": GOOD}, {"a": GOOD * np.nan}, serving_ms=1, candidate_ms=1)
    assert nan.disagreeing_rows == nan.rows and nan.max_abs_diff == float("inf")


POLICY = HealthPolicy(shadow_inferences=3, shadow_max_disagreement=0.1)


@pytest.mark.parametrize(
    ("samples", "policy", "timed_out", "problem"),
    [
        ([sample(), sample(1), sample()], POLICY, False, None),  # 1 of 30 rows: within 10%
        ([sample(2), sample(2), sample()], POLICY, False, "4 of 30 shadowed rows"),
        (
            [sample(diff=0.5)] * 3,
            HealthPolicy(shadow_inferences=3, shadow_max_abs_diff=0.1),
            False,
            "differ by up to 0.5",
        ),
        (
            [sample(candidate_ms=30)] * 3,
            HealthPolicy(shadow_inferences=3, shadow_max_latency_ratio=5),
            False,
            "latency",
        ),
        ([], POLICY, True, None),  # no traffic, shadow_on_timeout = pass (the default)
        ([sample()], HealthPolicy(shadow_inferences=3, shadow_on_timeout="fail"), True, "saw 1 of 3"),
        ([sample(5)], POLICY, True, "5 of 10"),  # a timed-out run still judges what it saw
    ],
    ids=["agrees", "disagrees", "abs_diff", "too_slow", "timeout_passes", "timeout_fails", "timeout_judges_seen"],
)
def test_shadow_verdict(
    samples: list[ShadowSample], policy: HealthPolicy, timed_out: bool, problem: str | None
) -> None:
    found = shadow_verdict(samples, policy, timed_out=timed_out)
    assert found is None if problem is None else problem in str(found)
