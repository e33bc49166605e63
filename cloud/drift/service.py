"""Drift of a version on the fleet: the windows of a sliding time range, merged per cohort, against its profile.

A cohort is the whole fleet (`by=None`), each value of a device tag (`by="site"`: one cohort per site; devices
without the tag form the cohort `site=` ), or each device (`by="device"`). Windows are those the devices sent
while serving exactly `model:version` that ended within the last `window_s` seconds; their sketches merge
(KLL sketches are mergeable: the merge is the sketch of the union) and their class counts add up.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import or_
from sqlalchemy import select as core_select
from sqlmodel import Session, col, select

from cloud.drift.labels import LabelledAccuracy, LabelSums, labelled_accuracy
from cloud.drift.rollups import decode_sketches, edge_of, merge_into, read_rollups
from cloud.drift.stats import CohortDrift, DriftThresholds, FeatureDrift, compare
from cloud.errors import InvalidInputError
from cloud.models import Device, ModelVersion, TelemetryRecord
from cloud.services.registry import reference_profile
from cloud.telemetry.rollups import bucket_of
from protocol.messages import utcnow
from protocol.profiles import ReferenceProfile
from protocol.sketches import SketchSet

__all__ = [
    "DEFAULT_WINDOW_S",
    "Cohort",
    "DriftReport",
    "cohort_key",
    "drift_public",
    "fleet_drift",
    "fleet_drifts",
    "profiled_versions",
]

log = logging.getLogger(__name__)

DEFAULT_WINDOW_S = 3600


@dataclass
class Cohort:
    """The merged telemetry of one cohort."""

    key: str
    devices: set[str] = field(default_factory=set)
    windows: int = 0
    inferences: int = 0
    sketches: SketchSet | None = None
    class_counts: Counter[str] = field(default_factory=Counter)
    unreadable: int = 0  # windows whose sketches did not decode or did not match the profile's features
    labels: LabelSums = field(default_factory=LabelSums)
    labelled: LabelledAccuracy | None = None  # set once the cohort is complete


@dataclass(frozen=True)
class DriftReport:
    """Drift of `model:version` per cohort over the last `window_s` seconds."""

    model: str
    version: str
    by: str | None
    window_s: int
    profile: ReferenceProfile
    cohorts: list[tuple[Cohort, CohortDrift]]
    until: datetime | None = None  # the range's end when it was asked for (None: now)
    thresholds: DriftThresholds = field(default_factory=DriftThresholds)


def cohort_key(device: Device | None, device_id: str, by: str | None) -> str:
    """The cohort a device's windows belong to: `fleet`, `device=<id>` or `<tag>=<value>`."""
    if by is None:
        return "fleet"
    if by == "device":
        return f"device={device_id}"
    tags = (device.tags if device is not None else None) or {}
    return f"{by}={tags.get(by, '')}"


def fleet_drift(
    *,
    session: Session,
    model: str,
    version: str,
    by: str | None = None,
    window_s: int = DEFAULT_WINDOW_S,
    thresholds: DriftThresholds | None = None,
    now: datetime | None = None,
    until: datetime | None = None,
) -> DriftReport:
    """Drift per cohort; `NotFoundError` when the version or its profile is missing."""
    [report] = fleet_drifts(
        session=session, model=model, version=version, groupings=[by], window_s=window_s, thresholds=thresholds,
        now=now, until=until,
    )  # fmt: skip
    return report


def fleet_drifts(
    *,
    session: Session,
    model: str,
    version: str,
    groupings: Sequence[str | None],
    window_s: int = DEFAULT_WINDOW_S,
    thresholds: DriftThresholds | None = None,
    now: datetime | None = None,
    until: datetime | None = None,
) -> list[DriftReport]:
    """Drift per cohort for each grouping (`by`), rollups and windows read and their sketches decoded once for all.

    Whole buckets come from the drift rollups (`cloud.drift.rollups`); the windows of the partial bucket at the start
    of the range and those not compacted yet are read raw: the same windows as reading them all, merged in another
    order (a KLL merge is the sketch of the union, within the sketch's error).

    `until` ends the range at a past time (windows that ended in `[until - window_s, until]`: drift over time is
    this query for consecutive ranges); without it the range ends now and has no upper bound, so that windows a
    device's clock stamped a little ahead still count. The bucket holding `until` is then read raw as well.
    """
    if window_s <= 0:
        raise InvalidInputError("window_s must be positive", field="window_s")
    thresholds = thresholds or DriftThresholds()
    profile = reference_profile(session=session, name=model, version=version)
    since = (until or now or utcnow()) - timedelta(seconds=window_s)
    mark, rollups = read_rollups(session, model=model, version=version, since=since, until=until)
    t = TelemetryRecord
    columns = [col(c) for c in (t.device_id, t.inference_count, t.class_counts, t.sketches, t.labels)]
    statement = core_select(*columns).where(
        col(t.model_name) == model, col(t.model_version) == version, col(t.window_end) >= since
    )
    if until is not None:
        statement = statement.where(col(t.window_end) <= until)
    if mark is not None:  # compacted windows of whole buckets are in the rollups just read
        edge = edge_of(since, mark.bucket_s)
        raw = [col(t.window_end) < edge, col(t.id) > mark.window_id]
        if until is not None:  # the partial bucket at the end of the range: no rollup read holds it
            raw.append(col(t.window_end) >= bucket_of(until, mark.bucket_s))
        statement = statement.where(or_(*raw))
    rows = session.connection().execute(statement.order_by(col(t.window_end))).all()
    ids = {r[0] for r in rows} | {r.device_id for r in rollups}
    devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(ids)))}
    by_grouping: list[dict[str, Cohort]] = [{} for _ in groupings]

    def cohorts_of(device_id: str) -> list[Cohort]:
        out = []
        for by, cohorts in zip(groupings, by_grouping, strict=True):
            key = cohort_key(devices.get(device_id), device_id, by)
            cohort = cohorts.setdefault(key, Cohort(key=key))
            cohort.devices.add(device_id)
            out.append(cohort)
        return out

    for rollup in rollups:
        sketches, reason = decode_sketches(rollup.sketches)
        for cohort in cohorts_of(rollup.device_id):
            _add(cohort, rollup.windows, rollup.inferences, rollup.class_counts, rollup.labels)
            cohort.unreadable += rollup.unreadable
            skipped = _merge(cohort, sketches) if sketches is not None else reason
            if skipped is not None:
                cohort.unreadable += rollup.windows - rollup.unreadable
                log.warning("drift: rollup sketches skipped cohort=%s reason=%s", cohort.key, skipped)
    for device_id, inferences, classes, raw, labels in rows:
        sketches, reason = decode_sketches(raw)
        for cohort in cohorts_of(device_id):
            _add(cohort, 1, inferences, classes, labels)
            skipped = _merge(cohort, sketches) if sketches is not None else reason
            if skipped is not None:
                cohort.unreadable += 1
                log.warning("drift: window sketches skipped cohort=%s reason=%s", cohort.key, skipped)
    regressor = profile.semantics.kind == "regressor"
    reports = []
    for by, cohorts in zip(groupings, by_grouping, strict=True):
        compared = []
        for cohort in sorted(cohorts.values(), key=lambda c: c.key):
            cohort.labelled = labelled_accuracy(
                cohort.labels, regressor=regressor, min_labels=thresholds.min_labels, reference=profile.accuracy
            )
            compared.append((cohort, compare(profile, cohort.sketches or SketchSet(), cohort.class_counts, thresholds)))
        reports.append(
            DriftReport(
                model=model,
                version=version,
                by=by,
                window_s=window_s,
                profile=profile,
                cohorts=compared,
                until=until,
                thresholds=thresholds,
            )
        )
    return reports


def _add(
    cohort: Cohort, windows: int, inferences: int, classes: Mapping[str, Any] | None, labels: Mapping[str, Any] | None
) -> None:
    cohort.windows += windows
    cohort.inferences += int(inferences)
    cohort.class_counts.update({str(k): int(v) for k, v in (classes or {}).items()})
    cohort.labels.add(labels)


def _merge(cohort: Cohort, sketches: SketchSet) -> str | None:
    """Add sketches to their cohort's; the reason when they do not fit (another input shape)."""
    cohort.sketches, reason = merge_into(cohort.sketches, sketches)
    return reason


def profiled_versions(session: Session, *, since: datetime) -> list[tuple[str, str]]:
    """`(model, version)` pairs with a reference profile that devices sent windows of since `since`."""
    served = session.exec(
        select(TelemetryRecord.model_name, TelemetryRecord.model_version)
        .where(col(TelemetryRecord.window_end) >= since, col(TelemetryRecord.model_name).is_not(None))
        .distinct()
    ).all()
    profiled = set(
        session.exec(
            select(ModelVersion.name, ModelVersion.version).where(col(ModelVersion.profile_sha256).is_not(None))
        ).all()
    )
    return sorted((str(m), str(v)) for m, v in served if (m, v) in profiled)


def drift_public(report: DriftReport) -> dict[str, Any]:
    """The API shape of a drift report."""
    return {
        "model": report.model,
        "version": report.version,
        "by": report.by,
        "window_s": report.window_s,
        "until": report.until.isoformat() if report.until else None,
        "thresholds": asdict(report.thresholds),
        "reference": {
            "rows": report.profile.rows,
            "accuracy": report.profile.accuracy,
            "source": report.profile.source,
            "feature_mode": report.profile.sketches.feature_mode,
            "features": len(report.profile.sketches.features),
            "class_counts": dict(report.profile.class_counts),
        },
        "cohorts": [_cohort_public(c, d) for c, d in report.cohorts],
    }


def _feature_public(f: FeatureDrift) -> dict[str, Any]:
    return {
        "index": f.index,
        "ks": f.ks,
        "critical": f.critical,
        "psi": f.psi,
        "wasserstein_iqr": f.wasserstein_iqr,
        "drifted": f.drifted,
    }


def _cohort_public(cohort: Cohort, drift: CohortDrift) -> dict[str, Any]:
    return {
        "cohort": cohort.key,
        "devices": sorted(cohort.devices),
        "windows": cohort.windows,
        "inferences": cohort.inferences,
        "rows": drift.rows,
        "unreadable_windows": cohort.unreadable,
        "drifted": drift.drifted,
        "insufficient": drift.insufficient,
        "reasons": drift.reasons,
        "max_ks": drift.max_ks,
        "features": [_feature_public(f) for f in drift.features],
        "class_counts": drift.class_counts,
        "class_psi": drift.class_psi,
        "class_js": drift.class_js,
        "confidence_ks": drift.confidence_ks,
        "confidence_median": drift.confidence_median,
        "reference_confidence_median": drift.reference_confidence_median,
        "estimated_accuracy": drift.estimated_accuracy,
        "reference_accuracy": drift.reference_accuracy,
        "accuracy_drop": drift.accuracy_drop,
        **_labelled_public(cohort),
    }


def _labelled_public(cohort: Cohort) -> dict[str, Any]:
    """Labelled accuracy next to the estimate: correct / labelled (regressors: MAE), or None with the reason."""
    labelled = cohort.labelled or LabelledAccuracy(0, None, None, "not computed")
    return {
        "labelled": labelled.labelled,
        "labelled_accuracy": labelled.accuracy,
        "labelled_mae": labelled.mae,
        "labelled_reason": labelled.reason,
        "reference_labelled_accuracy": labelled.reference,
        "labelled_accuracy_drop": labelled.drop,
    }
