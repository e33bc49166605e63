"""The fleet dashboard: the coordinator serves it at `/ui/` from this package's `static/` directory.

No build step and no third-party code: `index.html`, `app.css`, `app.js` (the frame and THE API client of the
browser: `api(path, opts)` sends the bearer token kept in sessionStorage and turns problem+json answers into
messages), one ES module per page in `static/pages/`. Every answer under `/ui/` carries a Content-Security-Policy
that admits only this origin (no inline script or style, no other host), so the page reads `/api/v1` and nothing
else. `/ui/meta.json` holds what the pages need from `protocol` (the latency histogram's bucket bounds).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.responses import JSONResponse, Response
from starlette.staticfiles import StaticFiles
from starlette.types import Scope

from protocol.telemetry import LATENCY_BUCKETS_MS

__all__ = ["CONTENT_SECURITY_POLICY", "DASHBOARD_URL", "STATIC_DIR", "DashboardFiles", "mount_dashboard"]

DASHBOARD_URL = "/ui/"
STATIC_DIR = Path(__file__).parent / "static"

CONTENT_SECURITY_POLICY = "; ".join(
    (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "font-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
_HEADERS = {
    "Content-Security-Policy": CONTENT_SECURITY_POLICY,
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    "Cache-Control": "no-cache",  # a new coordinator version's files are picked up at the next load
}


def _meta() -> dict[str, Any]:
    """What the pages need to know from `protocol`: latency buckets (ms) of the telemetry histograms."""
    return {"latency_buckets_ms": list(LATENCY_BUCKETS_MS)}


class DashboardFiles(StaticFiles):
    """The static files (index.html for `/ui/`) and `meta.json`, each answer with the dashboard's headers."""

    async def get_response(self, path: str, scope: Scope) -> Response:
        """The file at `path` (or `meta.json`), with the Content-Security-Policy and friends."""
        response = JSONResponse(_meta()) if path == "meta.json" else await super().get_response(path, scope)
        response.headers.update(_HEADERS)
        return response


def mount_dashboard(app: FastAPI) -> None:
    """Serve the dashboard at `/ui/` (not an API route: the data it shows comes from `/api/v1` with a token)."""
    app.mount(DASHBOARD_URL.rstrip("/"), DashboardFiles(directory=STATIC_DIR, html=True), name="dashboard")
