"""The REST API under `/api/v1`, plus `/healthz`: one module per resource; handlers call services and nothing else.

`system` (health, info, ingest counters, Prometheus `/metrics`), `models` (registry), `aliases` (movable names
of model versions), `artifacts` (model bytes), `devices`,
`enrolment` (device identity), `deployments`, `rollouts`, `fleet` (the summary), `tokens` (API tokens), `cards`
(model cards), `approvals` (what high-risk versions lack before they may be deployed) and `audit` (the log).
Every route needs a valid token (`requires()`), stricter roles where it writes, except what a device calls
before it has an identity (enrolment, renewal, CA, CRL) and artifacts (own check: a viewer token or a
device's download token). `deps` holds the shared dependencies, `problems` maps domain errors to problems.
"""

from fastapi import APIRouter

from cloud.api import (
    alerts,
    aliases,
    approvals,
    artifacts,
    audit,
    cards,
    deployments,
    devices,
    enrolment,
    fleet,
    governance,
    models,
    rollouts,
    system,
    tokens,
)
from cloud.api.deps import requires
from cloud.api.problems import install_problem_handlers

__all__ = ["PUBLIC_ROUTES", "install_problem_handlers", "router"]

router = APIRouter()
router.include_router(system.health_router)
router.include_router(system.metrics_router)
_v1 = APIRouter(prefix="/api/v1")
_v1.include_router(enrolment.public_router)
_v1.include_router(artifacts.router)
_v1.include_router(governance.public_router)
_protected = APIRouter(dependencies=[requires()])
for _resource in (
    system, models, aliases, cards, approvals, governance, devices, enrolment, deployments, fleet, rollouts, tokens,
    audit,
):  # fmt: skip
    _protected.include_router(_resource.router)
_protected.include_router(alerts.router)  # rules, alerts, acknowledgements (docs/alerts.md)
_v1.include_router(_protected)
router.include_router(_v1)

# Routes anyone may call (`tests/cloud/test_route_roles.py` checks that every other route needs a role).
PUBLIC_ROUTES = frozenset(
    {
        ("GET", "/healthz"),
        ("POST", "/api/v1/enrolment"),
        ("POST", "/api/v1/enrolment/renew"),
        ("GET", "/api/v1/enrolment/broker"),
        ("GET", "/api/v1/enrolment/federation"),
        ("GET", "/api/v1/pki/ca.pem"),
        ("GET", "/api/v1/pki/crl.pem"),
        ("GET", "/api/v1/tuf/metadata/{filename}"),  # signed: any TUF client verifies it
    }
)
