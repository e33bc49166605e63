"""Routes of fleet-wide views: the fleet summary."""

from __future__ import annotations

from fastapi import APIRouter

from cloud.api.deps import SessionDep
from cloud.telemetry import FleetSummary, fleet_summary

__all__ = ["router"]

router = APIRouter(tags=["fleet"])


@router.get("/fleet/summary", summary="Fleet summary")
def get_fleet_summary(session: SessionDep) -> FleetSummary:
    """Per device: active version, inference and error counts, latency p50/p95; plus totals."""
    return fleet_summary(session=session)
