"""`create_app(settings)`: the coordinator's FastAPI application, its broker, bridge and database wiring, and the
API docs pages (`/docs`, `/redoc`) served from local files.

Nothing is started at import time. The app's lifespan opens the database, creates the admin token,
starts the embedded broker when no `mqtt_url` is configured, connects the MQTT bridge, and with `federated` starts
the Flower SuperLink and the devices' node registration; it shuts all of them down in reverse order.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html, get_swagger_ui_oauth2_redirect_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cloud import __version__
from cloud.alerts.runner import AlertRunner
from cloud.api import ct as ct_routes
from cloud.api import drift, federated, install_problem_handlers, router
from cloud.api.deps import requires
from cloud.api.guard import RequestGuard
from cloud.artifacts import FileArtifactStore
from cloud.auth import ensure_admin_token, ensure_secret
from cloud.bridge import BridgeTls, MqttBridge
from cloud.broker import EmbeddedBroker, tls_files
from cloud.coordinator import Coordinator
from cloud.ct import service as ct
from cloud.ct.service import CtContext
from cloud.dashboard import mount_dashboard
from cloud.db import create_db_engine, init_db
from cloud.drift.rollups import compact_drift
from cloud.federation.runner import FederatedRunner
from cloud.federation.superlink import start_federation
from cloud.governance.maintainer import GovernanceMaintainer
from cloud.governance.service import Governance
from cloud.leases import Leases, leases_for
from cloud.metrics import CoordinatorMetrics
from cloud.periodic import Periodic
from cloud.rollouts.runner import RolloutRunner
from cloud.services.devices import mark_unconfirmed
from cloud.services.enrolment import refresh_crl
from cloud.settings import Settings
from cloud.telemetry.processes import plan_ingest, previous_processes, remember_processes
from cloud.telemetry.retention import prune_telemetry

__all__ = ["DOCS_ASSETS_URL", "DOCS_URL", "REDOC_URL", "create_app"]

log = logging.getLogger(__name__)

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
DOCS_ASSETS_URL = "/docs/assets"
_SWAGGER_JS = "swagger-ui-bundle.js"
_NO_ASSETS = (
    "<!DOCTYPE html><html><head><title>edgefleet API</title></head><body>"
    "<p>The interactive API docs need the swagger-ui files of the <code>fastapi-offline</code> package "
    "(part of the cloud extra: <code>pip install 'edgefleet[cloud]'</code>).</p>"
    '<p>The OpenAPI description of this API is at <a href="{openapi}">{openapi}</a>.</p></body></html>'
)

_BRIDGE_CONNECT_WAIT_S = 10.0


def _bridge_client_id(settings: Settings) -> str:
    if settings.replicated:  # one session per replica (a clean one: `cloud.bridge`)
        return f"{settings.mqtt_client_id or 'edgefleet-coordinator'}-{settings.replica}"
    if settings.mqtt_client_id:
        return settings.mqtt_client_id
    # Stable per coordinator (data dir + topic base) so the broker keeps its persistent session across restarts:
    # QoS 1 reports and telemetry sent while the coordinator is down are delivered when it comes back.
    digest = hashlib.sha256(f"{settings.data_dir.resolve()}|{settings.topic_base}".encode()).hexdigest()[:12]
    return f"edgefleet-coordinator-{digest}"


def _replicas_share_group(settings: Settings) -> str:
    """The shared subscription group of every replica of one coordinator: the same for all (derived from the topic
    base they share, whatever their data directories), so the broker hands each inbound message to one of them."""
    digest = hashlib.sha256(settings.topic_base.encode()).hexdigest()[:12]
    return f"edgefleet-replicas-{digest}"


def _telemetry_retention(coordinator: Coordinator) -> Periodic:
    """The periodic job deleting old raw telemetry windows and rollups (`cloud.telemetry.retention`)."""
    settings = coordinator.settings

    def step() -> None:
        prune_telemetry(
            coordinator.engine,
            window_days=settings.telemetry_retention_days,
            rollup_days=settings.rollup_retention_days,
            drift_rollup_days=settings.drift_rollup_retention_days,
        )

    return Periodic("telemetry-retention", step, settings.retention_tick_s, at_start=True, lease=coordinator.leases)


def _drift_compaction(coordinator: Coordinator) -> Periodic:
    """The periodic job merging new telemetry windows into drift rollups (`cloud.drift.rollups`)."""
    settings = coordinator.settings

    def step() -> None:
        # Between batches it rests as long as the batch took: ingest gets at least half of the process and of
        # SQLite's writer while a big fleet's minute of windows is merged.
        compact_drift(coordinator.engine, bucket_s=settings.drift_rollup_bucket_s, rest=job.rest)

    job = Periodic("drift-rollups", step, settings.drift_rollup_tick_s, lease=coordinator.leases)
    return job


def _continuous_training(coordinator: Coordinator) -> Periodic:
    """The periodic job turning drift alerts into federated runs and following them (`cloud.ct.service`)."""

    def step() -> None:
        with Session(coordinator.engine, expire_on_commit=False) as session:
            ct.step(session=session, context=CtContext.of(coordinator))

    return Periodic("continuous-training", step, coordinator.settings.ct_tick_s, lease=coordinator.leases)


def create_app(
    settings: Settings, *, enable_mqtt: bool = True, on_started: Callable[[Coordinator], None] | None = None
) -> FastAPI:
    """The coordinator application.

    `enable_mqtt=False` serves the API without broker or bridge (unit tests); `on_started` is called once
    the database, broker and bridge are up (the CLI prints the URLs and token from it).
    """
    settings.check_production_ready()
    coordinator = Coordinator(
        settings=settings,
        engine=create_db_engine(settings.database_url),
        store=FileArtifactStore(settings.data_dir / "artifacts", max_bytes=settings.max_artifact_bytes),
    )
    coordinator.leases = leases_for(
        coordinator.engine, replicated=settings.replicated, holder=settings.replica, ttl_s=settings.lease_ttl_s
    )
    coordinator.rollouts = RolloutRunner(
        engine=coordinator.engine,
        publisher=coordinator,
        links=lambda: coordinator.links,
        tick_s=settings.rollout_tick_s,
        leases=coordinator.leases,
    )
    # Rules every alert_tick_s, webhooks.
    alerts = AlertRunner(engine=coordinator.engine, settings=settings, leases=coordinator.leases)
    coordinator.federated_runs = FederatedRunner(
        engine=coordinator.engine,
        store=coordinator.store,
        data_dir=settings.data_dir,
        flower=lambda: coordinator.flower,
        api_url=lambda: _own_api_url(coordinator.settings),
        template=getattr(settings, "federated_app_dir", None),  # the Flower App template; default federated/flowerapp
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        retention: Periodic | None = None
        continuous: Periodic | None = None
        compaction: Periodic | None = None
        init_db(coordinator.engine)
        _prepare_secrets(coordinator)
        if enable_mqtt and settings.mqtt_url is None:
            _unconfirm_devices(coordinator)  # before the bridge: what it hears from now on confirms them
        try:
            coordinator.audit_checkpointer().start()  # signs the audit chain's head off the request path
            if enable_mqtt:
                _start_mqtt(coordinator)
            if coordinator.rollouts is not None and settings.rollout_tick_s > 0:
                coordinator.rollouts.start()  # after the bridge: its recovery publishes in-flight desired states
            alerts.start()  # evaluates with alert_tick_s > 0; delivers with webhook URLs (what a previous run left too)
            if settings.federated:  # the Flower SuperLink (or an external one) and the devices' node registration
                coordinator.federation = start_federation(settings, coordinator.fleet_pki(), coordinator.engine)
                coordinator.flower = coordinator.federation.control
            if coordinator.flower is not None and coordinator.federated_runs is not None:
                coordinator.federated_runs.start()  # picks up the runs a previous start left unfinished
            if coordinator.governance is not None and settings.governance_tick_s > 0:
                maintainer = GovernanceMaintainer(
                    coordinator.governance, coordinator, settings.governance_tick_s, coordinator.leases
                )
                coordinator.maintainer = maintainer
                maintainer.start()
            if settings.retention_tick_s > 0:
                retention = _telemetry_retention(coordinator)
                retention.start()
            if settings.ct_tick_s > 0:
                continuous = _continuous_training(coordinator)
                continuous.start()
            if settings.drift_rollup_tick_s > 0:
                compaction = _drift_compaction(coordinator)
                compaction.start()
            if on_started is not None:
                on_started(coordinator)
            yield
        finally:
            if compaction is not None:
                compaction.stop()
            if continuous is not None:
                continuous.stop()
            if retention is not None:
                retention.stop()
            if coordinator.federated_runs is not None:
                coordinator.federated_runs.stop()
            if coordinator.federation is not None:
                coordinator.federation.stop()
            if coordinator.maintainer is not None:
                coordinator.maintainer.stop()
            alerts.stop()
            if coordinator.rollouts is not None:
                coordinator.rollouts.stop()
            if coordinator.ingest is not None:
                coordinator.ingest.stop()
            if coordinator.bridge is not None:
                coordinator.bridge.stop()
            if coordinator.broker is not None:
                coordinator.broker.stop()
            if coordinator.audit is not None:
                coordinator.audit.stop()  # a last checkpoint of what was recorded since the previous one
            if coordinator.leases is not None:
                _release_leases(coordinator.leases)  # the other replicas take the work over at their next tick
            coordinator.engine.dispose()
            log.info("coordinator stopped")

    app = FastAPI(
        title="edgefleet coordinator",
        version=__version__,
        description="Model registry, deployments and fleet telemetry for edge devices.",
        lifespan=lifespan,
        docs_url=None,  # served by `_offline_docs`: FastAPI's own pages load their scripts from a CDN
        redoc_url=None,
    )
    app.state.coordinator = coordinator
    app.state.alerts = alerts
    app.state.metrics = CoordinatorMetrics(coordinator)  # `GET /metrics`
    install_problem_handlers(app)
    app.add_middleware(RequestGuard)
    app.include_router(router)
    app.include_router(federated.router, prefix="/api/v1", dependencies=[requires()])
    app.include_router(drift.router, prefix="/api/v1", dependencies=[requires()])
    app.include_router(ct_routes.router, prefix="/api/v1", dependencies=[requires()])
    _offline_docs(app)
    mount_dashboard(app)  # `/ui/`: the fleet dashboard (docs/dashboard.md)
    return app


def _release_leases(leases: Leases) -> None:
    """Give up this replica's leases at a clean stop; a failure is logged (they then expire by themselves)."""
    try:
        leases.release_all()
    except SQLAlchemyError as exc:
        log.warning("leases not released (they expire after at most their TTL): %s", exc)


def _own_api_url(settings: Settings) -> str:
    """The coordinator's own API as a process on its host reaches it (the bound host and port, not public_url)."""
    return settings.model_copy(update={"public_url": None}).resolved_public_url()


def _docs_assets() -> Path | None:
    """The directory of swagger-ui and ReDoc files that `fastapi-offline` ships (cloud extra); None if absent."""
    spec = importlib.util.find_spec("fastapi_offline")
    if spec is None or spec.origin is None:
        return None
    assets = Path(spec.origin).parent / "static"
    return assets if (assets / _SWAGGER_JS).is_file() else None


def _offline_docs(app: FastAPI) -> None:
    """`/docs` (Swagger UI) and `/redoc` from files served by the coordinator itself, so they work on a network
    without internet; without those files, `/docs` says where the OpenAPI description is."""
    assets = _docs_assets()
    openapi_url = app.openapi_url or "/openapi.json"
    if assets is None:

        @app.get(DOCS_URL, include_in_schema=False)
        def no_assets() -> HTMLResponse:
            return HTMLResponse(_NO_ASSETS.format(openapi=openapi_url))

        return
    app.mount(DOCS_ASSETS_URL, StaticFiles(directory=assets), name="docs-assets")
    redirect_url = app.swagger_ui_oauth2_redirect_url or "/docs/oauth2-redirect"

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=openapi_url,
            title=f"{app.title} - API",
            oauth2_redirect_url=redirect_url,
            swagger_js_url=f"{DOCS_ASSETS_URL}/{_SWAGGER_JS}",
            swagger_css_url=f"{DOCS_ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
            swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the public validator
        )

    @app.get(redirect_url, include_in_schema=False)
    def swagger_ui_redirect() -> HTMLResponse:
        return get_swagger_ui_oauth2_redirect_html()

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc() -> HTMLResponse:
        return get_redoc_html(
            openapi_url=openapi_url,
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{DOCS_ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{DOCS_ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )


def _prepare_secrets(coordinator: Coordinator) -> None:
    """The data directory (0700), the admin token, the fleet CA and the artifact download key."""
    settings = coordinator.settings
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    if settings.admin_token:
        coordinator.admin_token = settings.admin_token
    else:
        coordinator.admin_token, created = ensure_admin_token(settings.data_dir)
        coordinator.admin_token_created = created
        if created:
            log.info("admin token created path=%s", settings.data_dir / "admin-token")
    pki = coordinator.fleet_pki()
    coordinator.artifact_secret = ensure_secret(pki.directory / "artifact-url.key")
    refresh_crl(engine=coordinator.engine, pki=pki)
    coordinator.governance = Governance(coordinator.engine, settings)
    coordinator.governance.ensure_initialized()


def _unconfirm_devices(coordinator: Coordinator) -> None:
    """Devices `online` before this start are `unknown` until heard from: the embedded broker's wills died with it.

    Not with an external broker: it outlives the coordinator and queues the wills of devices that went away
    meanwhile for the bridge's persistent session, so the stored status stays true across a restart.
    """
    with Session(coordinator.engine) as session:
        marked = mark_unconfirmed(session=session)
    if marked:
        log.info("devices not heard from since this start count=%d status=unknown", marked)


def _start_mqtt(coordinator: Coordinator) -> None:
    settings = coordinator.settings
    pki = coordinator.fleet_pki()
    url = settings.mqtt_url
    if url is None:
        coordinator.broker = EmbeddedBroker(
            settings.embedded_broker_host,
            settings.embedded_broker_port,
            tls=tls_files(pki.directory),
            topic_base=settings.topic_base,
            state_dir=settings.data_dir,  # keeps its port and its sessions, queued and retained messages
        )
        coordinator.broker.start()
        url = coordinator.broker.url
    coordinator.mqtt_url = url
    cert, key = coordinator.bridge_certificate()
    tls = BridgeTls(ca=settings.mqtt_ca_file or pki.ca_path, cert=cert, key=key)
    client_id = _bridge_client_id(settings)
    batching: dict[str, Any] = {
        "gap_grace_s": settings.telemetry_gap_grace_s,
        "batch_max": settings.ingest_batch_max,
        "batch_wait_s": settings.ingest_batch_wait_ms / 1000,
        "bucket_s": settings.rollup_bucket_s,
    }
    processes = settings.ingest_processes  # > 1 only with an external broker (Settings refuses the embedded one)
    group: str | None
    if settings.replicated:  # every inbound channel shared with the other replicas (ingest_processes is 1)
        group = _replicas_share_group(settings)
    else:
        group, coordinator.ingest = plan_ingest(
            processes=processes,
            previous=previous_processes(settings.data_dir) if coordinator.broker is None else 1,
            url=url,
            tls=tls,
            client_id=client_id,
            counters=coordinator.counters,
            topic_base=settings.topic_base,
            database_url=settings.database_url,
            **batching,
        )
        if coordinator.broker is None:
            remember_processes(settings.data_dir, processes)
    coordinator.bridge = MqttBridge(
        url=url,
        topics=settings.topics,
        engine=coordinator.engine,
        counters=coordinator.counters,
        client_id=client_id,
        tls=tls,
        share_group=group,
        share_telemetry=processes > 1,
        share_inbound=settings.replicated,
        **batching,
    )
    coordinator.bridge.start()
    if coordinator.ingest is not None:
        coordinator.ingest.start()  # telemetry ingest over several processes (cloud.telemetry.processes)
    if not coordinator.bridge.wait_connected(_BRIDGE_CONNECT_WAIT_S):
        log.warning("mqtt bridge not connected yet url=%s; /healthz reports not ready until it is", url)
