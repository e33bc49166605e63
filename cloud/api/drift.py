"""Routes of drift: a version's drift per cohort against its reference profile, as JSON, or as a report: an HTML
page or a PNG image (any role; docs/drift.md)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path, Query
from fastapi.responses import HTMLResponse, Response
from pydantic import AwareDatetime

from cloud.api.deps import SessionDep
from cloud.drift.png import render_png
from cloud.drift.report import render_html
from cloud.drift.service import DEFAULT_WINDOW_S, drift_public, fleet_drift
from cloud.drift.stats import DriftThresholds
from protocol.messages import Name, Version

__all__ = ["router"]

router = APIRouter(prefix="/drift", tags=["drift"])

_By = Annotated[
    str | None,
    Query(
        max_length=64,
        pattern=r"^[A-Za-z0-9_.-]+$",
        description="Cohorts: a device tag key (one cohort per value, e.g. `site`), or `device`; default: the fleet.",
    ),
]
_Window = Annotated[int, Query(ge=60, le=90 * 86400, description="Sliding window in seconds (windows ending in it).")]
_MinEffect = Annotated[float, Query(gt=0, le=1, description="Smallest feature KS that counts as drift.")]
_AccuracyDrop = Annotated[float, Query(gt=0, le=1, description="Estimated-accuracy drop that counts as drift.")]
_Until = Annotated[
    AwareDatetime | None,
    Query(description="End of the range (ISO 8601 with its zone); default: now. Drift over time: one query per range."),
]


@router.get(
    "/{name}/{version}",
    summary="Drift of a version per cohort against its reference profile",
    responses={404: {"description": "No such version, or it has no reference profile."}},
)
def get_drift(
    name: Annotated[Name, Path()],
    version: Annotated[Version, Path()],
    session: SessionDep,
    by: _By = None,
    window_s: _Window = DEFAULT_WINDOW_S,
    min_effect: _MinEffect = DriftThresholds.min_effect,
    accuracy_drop: _AccuracyDrop = DriftThresholds.accuracy_drop,
    until: _Until = None,
) -> dict[str, Any]:
    """Per cohort: rows, per-feature KS/PSI/Wasserstein, class shift, confidence shift, estimated accuracy."""
    thresholds = DriftThresholds(min_effect=min_effect, accuracy_drop=accuracy_drop)
    report = fleet_drift(
        session=session, model=name, version=version, by=by, window_s=window_s, thresholds=thresholds, until=until
    )
    return drift_public(report)


_PNG: dict[int | str, dict[str, Any]] = {
    200: {"content": {"text/html": {}, "image/png": {}}, "description": "The page, or the image."}
}


@router.get(
    "/{name}/{version}/report",
    summary="The drift report of a version: a self-contained HTML page, or a PNG image",
    response_class=HTMLResponse,
    responses={**_PNG, 404: {"description": "No such version, or it has no reference profile."}},
)
def get_drift_report(
    name: Annotated[Name, Path()],
    version: Annotated[Version, Path()],
    session: SessionDep,
    by: _By = None,
    window_s: _Window = DEFAULT_WINDOW_S,
    format: Annotated[Literal["html", "png"], Query(description="`html` (default) or `png`.")] = "html",
) -> Response:
    """The same figures as `GET /drift/{name}/{version}`, with charts per cohort: inline SVG in a page without
    scripts, or one PNG image (`format=png`, or `GET .../report.png`)."""
    report = fleet_drift(session=session, model=name, version=version, by=by, window_s=window_s)
    if format == "png":
        return Response(render_png(drift_public(report)), media_type="image/png")
    return HTMLResponse(render_html(drift_public(report)))


@router.get(
    "/{name}/{version}/report.png",
    summary="The drift report of a version as a PNG image",
    response_class=Response,
    responses={200: {"content": {"image/png": {}}}, 404: {"description": "No such version, or no reference profile."}},
)
def get_drift_report_png(
    name: Annotated[Name, Path()],
    version: Annotated[Version, Path()],
    session: SessionDep,
    by: _By = None,
    window_s: _Window = DEFAULT_WINDOW_S,
) -> Response:
    """`GET /drift/{name}/{version}/report?format=png` under a name that ends like the file it is."""
    report = fleet_drift(session=session, model=name, version=version, by=by, window_s=window_s)
    return Response(render_png(drift_public(report)), media_type="image/png")
