"""Drift as an alert source (in `cloud.alerts.sources.SOURCES`): per profiled version served in the drift window and per
grouping (the settings' `drift_group_by` and every continuous-training policy's), one observation per judged
cohort: whether it drifted (1/0), how far its estimated accuracy fell under the reference's, and — with at least
`drift_min_labels` labels fed back in the window — how far its labelled accuracy fell under the reference's."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta

from sqlmodel import Session, col, select

from cloud.alerts.rules import FLEET, Observation, Rule
from cloud.drift.service import fleet_drifts, profiled_versions
from cloud.drift.stats import DriftThresholds
from cloud.models import CtPolicy
from cloud.settings import Settings

__all__ = [
    "DRIFT",
    "ESTIMATED_ACCURACY_DROP",
    "LABELLED_ACCURACY_DROP",
    "drift_observations",
    "drift_rules",
    "policy_groupings",
]

log = logging.getLogger(__name__)

DRIFT = "drift"
ESTIMATED_ACCURACY_DROP = "estimated_accuracy_drop"
LABELLED_ACCURACY_DROP = "labelled_accuracy_drop"


def policy_groupings(session: Session) -> dict[str, set[str]]:
    """model name → the tag keys its enabled continuous-training policies group cohorts by."""
    out: dict[str, set[str]] = {}
    for model, by in session.exec(select(CtPolicy.model_name, CtPolicy.by).where(col(CtPolicy.enabled))):
        out.setdefault(model, set()).add(by)
    return out


def _by(grouping: str) -> str | None:
    return None if grouping == FLEET else grouping


def drift_observations(session: Session, now: datetime, settings: Settings) -> list[Observation]:
    """Per profiled version, grouping and judged cohort: drifted (1/0) and the estimated-accuracy drop."""
    since = now - timedelta(seconds=settings.drift_window_s)
    extra = policy_groupings(session)
    thresholds = DriftThresholds(
        min_rows=settings.drift_min_rows,
        accuracy_drop=settings.drift_accuracy_drop,
        min_labels=settings.drift_min_labels,
    )
    observations: list[Observation] = []
    for model, version in profiled_versions(session, since=since):
        groupings = [_by(g) for g in sorted({settings.drift_group_by} | extra.get(model, set()))]
        reports = fleet_drifts(
            session=session, model=model, version=version, groupings=groupings,
            window_s=int(settings.drift_window_s), thresholds=thresholds, now=now,
        )  # fmt: skip
        for report in reports:
            for cohort, drift in report.cohorts:
                ref = f"{model}:{version}"
                labelled = cohort.labelled
                if labelled is not None and labelled.drop is not None:  # enough labels, whatever the rows sketched
                    observations.append(
                        Observation(LABELLED_ACCURACY_DROP, labelled.drop, cohort=cohort.key, model=ref)
                    )
                if drift.insufficient:
                    continue  # too few rows to judge: neither opens nor resolves by itself
                observations.append(Observation(DRIFT, 1.0 if drift.drifted else 0.0, cohort=cohort.key, model=ref))
                if drift.accuracy_drop is not None:
                    observations.append(
                        Observation(ESTIMATED_ACCURACY_DROP, drift.accuracy_drop, cohort=cohort.key, model=ref)
                    )
    return observations


def drift_rules(settings: Settings) -> list[Rule]:
    """The drift rules: a cohort drifted (any of the statistics), its estimated or labelled accuracy fell too far."""
    return [
        Rule(
            name="drift",
            metric=DRIFT,
            op=">=",
            threshold=1,
            severity="warning",
            description="a cohort's inputs, predicted classes or estimated accuracy drifted from the reference profile "
            f"(windows of the last {settings.drift_window_s:g} s; `edgefleet drift show` says which and why)",
        ),
        Rule(
            name="estimated_accuracy",
            metric=ESTIMATED_ACCURACY_DROP,
            threshold=settings.drift_accuracy_drop,
            severity="critical",
            description="a cohort's estimated accuracy (from its confidence, calibrated on the reference data) is "
            "this far under the reference's",
        ),
        Rule(
            name="labelled_accuracy",
            metric=LABELLED_ACCURACY_DROP,
            threshold=settings.drift_accuracy_drop,
            severity="critical",
            description="a cohort's labelled accuracy (labels local applications fed back, at least "
            f"{settings.drift_min_labels} in the window) is this far under the reference's",
        ),
    ]
