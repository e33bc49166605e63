"""Drift of a cohort's merged window sketches against a version's reference profile. Pure: data in, figures out.

Per feature (an input value, or a chunk-means projection of a large input; `protocol.sketches`):

- **KS**, the Kolmogorov-Smirnov statistic sup |F_ref(x) - F_cur(x)|, both CDFs read from the KLL sketches at
  the union of their quantiles (each CDF is within the sketch's normalized rank error of the exact one, so the
  statistic is within twice that). A feature drifts when KS is above both `min_effect` (a shift worth a look)
  and the two-sample critical value at `alpha` (Bonferroni-corrected over the features) plus twice the rank
  error: a large cohort does not alarm on a negligible shift, a small one not on noise.
- **PSI** over ten bins at the reference's deciles (`cloud.rollouts.stats.population_stability_index`, the
  rollout gates' formula), and the **Wasserstein** distance (scipy) between the two quantile functions, in units
  of the reference's interquartile range.

Outputs: the predicted-class distribution against the reference's (PSI and Jensen-Shannon, the rollout gates'
functions), the top-1 confidence (KS and medians), and the **estimated accuracy** without labels: the
reference's calibration (`protocol.profiles`: for ranges of confidence, the share of right predictions) applied
to the share of the cohort's predictions in each range (confidence-based performance estimation, as NannyML's
CBPE does). Its reference figure is the same estimate on the reference sketch, so the drop compares like with like.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
from datasketches import kll_floats_sketch
from scipy.stats import kstwo, wasserstein_distance

from cloud.rollouts.stats import jensen_shannon_divergence, population_stability_index
from protocol.profiles import CalibrationBin, ReferenceProfile
from protocol.sketches import SketchSet

__all__ = [
    "CohortDrift",
    "DriftThresholds",
    "FeatureDrift",
    "compare",
    "estimated_accuracy",
    "feature_drift",
]

_GRID = 101  # quantiles read from each sketch to compare them


@dataclass(frozen=True)
class DriftThresholds:
    """When a cohort counts as drifted. Defaults: a KS shift of 0.1 that is not noise, a class PSI above the
    credit-scoring "major shift" 0.25, or an estimated accuracy 5 points under the reference's."""

    min_effect: float = 0.1
    alpha: float = 0.001
    class_psi: float = 0.25
    accuracy_drop: float = 0.05
    min_rows: int = 200
    min_labels: int = 50  # labelled accuracy is reported on at least this many labels fed back


@dataclass(frozen=True)
class FeatureDrift:
    """One feature's distance from the reference."""

    index: int
    ks: float
    critical: float
    psi: float
    wasserstein_iqr: float
    drifted: bool


@dataclass(frozen=True)
class CohortDrift:
    """A cohort's drift against the reference profile, and whether (and why) it counts as drifted."""

    rows: int
    features: list[FeatureDrift]
    class_counts: dict[str, int]
    class_psi: float | None
    class_js: float | None
    confidence_ks: float | None
    confidence_median: float | None
    reference_confidence_median: float | None
    estimated_accuracy: float | None
    reference_accuracy: float | None
    insufficient: bool
    drifted: bool
    reasons: list[str] = field(default_factory=list)

    @property
    def max_ks(self) -> float:
        """The largest feature KS (0 without features)."""
        return max((f.ks for f in self.features), default=0.0)

    @property
    def accuracy_drop(self) -> float | None:
        """Reference minus estimated accuracy (positive: worse than the reference)."""
        if self.estimated_accuracy is None or self.reference_accuracy is None:
            return None
        return self.reference_accuracy - self.estimated_accuracy


def _cdfs(reference: kll_floats_sketch, current: kll_floats_sketch) -> tuple[np.ndarray, np.ndarray]:
    ranks = list(np.linspace(0.0, 1.0, _GRID))
    grid = np.unique(np.concatenate([reference.get_quantiles(ranks), current.get_quantiles(ranks)]))
    points = [float(x) for x in grid]
    return np.asarray(reference.get_cdf(points)[:-1]), np.asarray(current.get_cdf(points)[:-1])


def ks_statistic(reference: kll_floats_sketch, current: kll_floats_sketch) -> float:
    """sup |F_ref - F_cur| read from two KLL sketches."""
    if reference.is_empty() or current.is_empty():
        return 0.0
    ref_cdf, cur_cdf = _cdfs(reference, current)
    return float(np.max(np.abs(ref_cdf - cur_cdf)))


def _psi(reference: kll_floats_sketch, current: kll_floats_sketch) -> float:
    edges = sorted({float(q) for q in reference.get_quantiles([i / 10 for i in range(1, 10)])})
    if not edges:
        return 0.0
    ref = reference.get_pmf(edges)
    cur = current.get_pmf(edges)
    as_counts = lambda pmf, n: {str(i): round(p * n) for i, p in enumerate(pmf)}  # noqa: E731
    return population_stability_index(as_counts(ref, reference.n), as_counts(cur, current.n))


def _wasserstein_iqr(reference: kll_floats_sketch, current: kll_floats_sketch) -> float:
    ranks = list(np.linspace(0.005, 0.995, _GRID))
    ref_q, cur_q = np.asarray(reference.get_quantiles(ranks)), np.asarray(current.get_quantiles(ranks))
    low, high = reference.get_quantiles([0.25, 0.75])
    scale = float(high - low) or float(np.std(ref_q)) or 1.0
    return float(wasserstein_distance(ref_q, cur_q)) / scale


def _critical(n: int, m: int, alpha: float) -> float:
    """The two-sample KS critical value at `alpha` (scipy's exact one-sample distribution at the effective size)."""
    effective = max(1, round(n * m / (n + m)))
    return float(kstwo.isf(alpha, effective))


def feature_drift(
    index: int,
    reference: kll_floats_sketch,
    current: kll_floats_sketch,
    *,
    features: int,
    thresholds: DriftThresholds,
) -> FeatureDrift:
    """The distance of one feature's current sketch from its reference sketch."""
    ks = ks_statistic(reference, current)
    error = 2 * kll_floats_sketch.get_normalized_rank_error(min(reference.k, current.k), False)
    critical = _critical(reference.n, current.n, thresholds.alpha / max(1, features)) + error
    return FeatureDrift(
        index=index,
        ks=ks,
        critical=critical,
        psi=_psi(reference, current),
        wasserstein_iqr=_wasserstein_iqr(reference, current),
        drifted=ks > max(critical, thresholds.min_effect),
    )


def estimated_accuracy(calibration: Sequence[CalibrationBin], confidence: kll_floats_sketch) -> float | None:
    """Σ over the calibration ranges of (share of predictions in the range) x (the range's accuracy)."""
    if not calibration or confidence.is_empty():
        return None
    bounds = [float(b.high) for b in calibration[:-1]]
    shares = confidence.get_pmf(bounds) if bounds else [1.0]
    return float(sum(share * b.accuracy for share, b in zip(shares, calibration, strict=True)))


def _median(sketch: kll_floats_sketch | None) -> float | None:
    return None if sketch is None or sketch.is_empty() else float(sketch.get_quantile(0.5))


def compare(
    profile: ReferenceProfile,
    current: SketchSet,
    class_counts: Mapping[str, int],
    thresholds: DriftThresholds | None = None,
) -> CohortDrift:
    """A cohort's merged sketches and class counts against the version's reference profile."""
    thresholds = thresholds or DriftThresholds()
    reference = SketchSet.from_wire(profile.sketches)
    rows = current.rows
    counts = {k: int(v) for k, v in class_counts.items() if v > 0}
    ref_conf, cur_conf = reference.confidence_sketch(), current.confidence_sketch()
    reference_accuracy = estimated_accuracy(profile.calibration, ref_conf) if ref_conf is not None else None
    estimate = estimated_accuracy(profile.calibration, cur_conf) if cur_conf is not None else None
    if rows < thresholds.min_rows:
        return CohortDrift(
            rows=rows, features=[], class_counts=counts, class_psi=None, class_js=None, confidence_ks=None,
            confidence_median=_median(cur_conf), reference_confidence_median=_median(ref_conf),
            estimated_accuracy=estimate, reference_accuracy=reference_accuracy, insufficient=True, drifted=False,
            reasons=[f"{rows} rows sketched, fewer than the {thresholds.min_rows} drift needs"],
        )  # fmt: skip
    features = _features(reference, current, thresholds)
    class_psi = class_js = None
    if counts and profile.class_counts:
        class_psi = population_stability_index(profile.class_counts, counts)
        class_js = jensen_shannon_divergence(profile.class_counts, counts)
    confidence_ks = ks_statistic(ref_conf, cur_conf) if ref_conf is not None and cur_conf is not None else None
    reasons = [
        f"feature {f.index}: KS {f.ks:.3f} above {max(f.critical, thresholds.min_effect):.3f}"
        for f in features
        if f.drifted
    ]
    if class_psi is not None and class_psi > thresholds.class_psi:
        reasons.append(f"predicted classes: PSI {class_psi:.3f} above {thresholds.class_psi:.2f}")
    if (
        estimate is not None
        and reference_accuracy is not None
        and reference_accuracy - estimate > thresholds.accuracy_drop
    ):
        reasons.append(
            f"estimated accuracy {estimate:.3f}, {100 * (reference_accuracy - estimate):.1f} points under the "
            f"reference's {reference_accuracy:.3f}"
        )
    return CohortDrift(
        rows=rows, features=features, class_counts=counts, class_psi=class_psi, class_js=class_js,
        confidence_ks=confidence_ks, confidence_median=_median(cur_conf),
        reference_confidence_median=_median(ref_conf), estimated_accuracy=estimate,
        reference_accuracy=reference_accuracy, insufficient=False, drifted=bool(reasons), reasons=reasons,
    )  # fmt: skip


def _features(reference: SketchSet, current: SketchSet, thresholds: DriftThresholds) -> list[FeatureDrift]:
    count = min(reference.feature_count, current.feature_count)
    out = []
    for i in range(count):
        ref, cur = reference.feature_sketch(i), current.feature_sketch(i)
        if ref is None or cur is None or ref.is_empty() or cur.is_empty():
            continue
        out.append(feature_drift(i, ref, cur, features=count, thresholds=thresholds))
    return out


def finite(value: float | None) -> float | None:
    """None for a NaN or infinity (JSON has no place for them)."""
    return None if value is None or not math.isfinite(value) else value
