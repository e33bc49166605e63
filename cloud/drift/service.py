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
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlmodel import Session, col, select

from cloud.drift.stats import CohortDrift, DriftThresholds, FeatureDrift, compare
from cloud.errors import InvalidInputError
from cloud.models import Device, ModelVersion, TelemetryRecord
from cloud.services.registry import reference_profile
from protocol.errors import ProtocolError
from protocol.messages import utcnow
from protocol.profiles import ReferenceProfile
from protocol.sketches import SketchSet, WindowSketches

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


@dataclass(frozen=True)
class DriftReport:
    """Drift of `model:version` per cohort over the last `window_s` seconds."""

    model: str
    version: str
    by: str | None
    window_s: int
    profile: ReferenceProfile
    cohorts: list[tuple[Cohort, CohortDrift]]


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
) -> DriftReport:
    """Drift per cohort; `NotFoundError` when the version or its profile is missing."""
    [report] = fleet_drifts(
        session=session, model=model, version=version, groupings=[by], window_s=window_s, thresholds=thresholds,
        now=now,
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
) -> list[DriftReport]:
    """Drift per cohort for each grouping (`by`), the windows read and their sketches decoded once for all."""
    if window_s <= 0:
        raise InvalidInputError("window_s must be positive", field="window_s")
    profile = reference_profile(session=session, name=model, version=version)
    since = (now or utcnow()) - timedelta(seconds=window_s)
    rows = session.exec(
        select(TelemetryRecord.device_id, TelemetryRecord.inference_count, TelemetryRecord.class_counts,
               TelemetryRecord.sketches)
        .where(TelemetryRecord.model_name == model, TelemetryRecord.model_version == version,
               col(TelemetryRecord.window_end) >= since)
        .order_by(col(TelemetryRecord.window_end))
    ).all()  # fmt: skip
    devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_({r[0] for r in rows})))}
    by_grouping: list[dict[str, Cohort]] = [{} for _ in groupings]
    for device_id, inferences, classes, raw in rows:
        counts = {str(k): int(v) for k, v in (classes or {}).items()}
        sketches, reason = _decoded(raw)
        for by, cohorts in zip(groupings, by_grouping, strict=True):
            key = cohort_key(devices.get(device_id), device_id, by)
            cohort = cohorts.setdefault(key, Cohort(key=key))
            cohort.devices.add(device_id)
            cohort.windows += 1
            cohort.inferences += int(inferences)
            cohort.class_counts.update(counts)
            skipped = _merge(cohort, sketches) if sketches is not None else reason
            if skipped is not None:
                cohort.unreadable += 1
                log.warning("drift: window sketches skipped cohort=%s reason=%s", cohort.key, skipped)
    reports = []
    for by, cohorts in zip(groupings, by_grouping, strict=True):
        compared = [
            (cohort, compare(profile, cohort.sketches or SketchSet(), cohort.class_counts, thresholds))
            for cohort in sorted(cohorts.values(), key=lambda c: c.key)
        ]
        reports.append(
            DriftReport(model=model, version=version, by=by, window_s=window_s, profile=profile, cohorts=compared)
        )
    return reports


def _decoded(raw: Mapping[str, Any] | None) -> tuple[SketchSet | None, str | None]:
    """A window's sketches decoded (once, whatever the number of cohorts it counts in); the reason when they do not
    decode (a device's sketches that do not decode are skipped, its counts still count)."""
    if not raw:
        return None, None
    try:
        return SketchSet.from_wire(WindowSketches.model_validate(raw)), None
    except (ValueError, ProtocolError) as exc:
        return None, str(exc)


def _merge(cohort: Cohort, sketches: SketchSet) -> str | None:
    """Add a window's sketches to its cohort's; the reason when they do not fit (another input shape)."""
    try:
        if cohort.sketches is None:
            cohort.sketches = SketchSet()
        cohort.sketches.merge(sketches)
    except (ValueError, ProtocolError) as exc:
        return str(exc)
    return None


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
        "reference": {
            "rows": report.profile.rows,
            "accuracy": report.profile.accuracy,
            "source": report.profile.source,
            "feature_mode": report.profile.sketches.feature_mode,
            "features": len(report.profile.sketches.features),
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
    }
