"""Health, coordinator information, who is calling, ingest counters and Prometheus metrics."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from cloud import __version__
from cloud.api.deps import CoordinatorDep, PrincipalDep, requires
from cloud.metrics import CoordinatorMetrics

__all__ = ["health_router", "metrics_router", "router"]

router = APIRouter(tags=["system"])
health_router = APIRouter(tags=["system"])
# `/metrics` where Prometheus looks by default; a read like any other (`authorization:` in the scrape config).
metrics_router = APIRouter(tags=["system"], dependencies=[requires()])


@health_router.get("/healthz", summary="Liveness and readiness")
def healthz(coordinator: CoordinatorDep) -> JSONResponse:
    """200 when the database answers, the bridge is connected and not waiting for the database (or MQTT is off)."""
    checks: dict[str, Any] = {}
    try:
        with coordinator.engine.connect() as connection:
            connection.execute(text("SELECT 1"))
        checks["database"] = "ok"
    except SQLAlchemyError as exc:
        checks["database"] = f"error: {exc.__class__.__name__}"
    bridge = coordinator.bridge
    checks["broker"] = "disabled" if bridge is None else ("ok" if bridge.connected else "disconnected")
    # The bridge holds inbound messages (unacknowledged) until its retry reaches the database again.
    checks["ingest"] = "disabled" if bridge is None else ("waiting for the database" if bridge.database_down else "ok")
    ready = checks["database"] == "ok" and all(checks[k] in {"ok", "disabled"} for k in ("broker", "ingest"))
    return JSONResponse(
        {"status": "ok" if ready else "unavailable", "checks": checks}, status_code=200 if ready else 503
    )


@router.get("/info", summary="Coordinator version, MQTT URL and topic base")
def info(coordinator: CoordinatorDep) -> dict[str, Any]:
    """What an agent or operator needs to talk to this coordinator."""
    return {
        "version": __version__,
        "mqtt_url": coordinator.device_mqtt_url,  # never with credentials
        "topic_base": coordinator.settings.topic_base,
        "public_url": coordinator.public_url,
        "environment": coordinator.settings.environment.value,
    }


@router.get("/whoami", summary="The calling token's name and role")
def whoami(principal: PrincipalDep) -> dict[str, str]:
    """Who this bearer token is: its name and its one role (the dashboard shows only what that role may do)."""
    return {"name": principal.name, "role": principal.role.value}


@router.get("/stats", summary="MQTT ingest counters")
def get_stats(coordinator: CoordinatorDep) -> dict[str, Any]:
    """Messages received, stored, rejected as malformed (per channel and `rejected_total`), duplicates dropped."""
    connected = coordinator.bridge is not None and coordinator.bridge.connected
    return {**coordinator.counters.snapshot(), "mqtt_connected": connected}


@metrics_router.get("/metrics", summary="Prometheus metrics", response_class=Response)
def metrics(request: Request) -> Response:
    """The coordinator's metrics in the Prometheus text format (OpenMetrics when `Accept` asks for it)."""
    exporter: CoordinatorMetrics = request.app.state.metrics
    body, content_type = exporter.exposition(request.headers.get("accept"))
    return Response(body, media_type=content_type)
