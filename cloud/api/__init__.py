"""The REST API under `/api/v1`, plus `/healthz`: one module per resource; handlers call services and nothing else.

`system` (health, info, ingest counters), `models` (registry and artifacts), `devices`, `deployments`,
`rollouts`, `fleet` (the summary). `deps` holds the dependencies every route shares, `problems` maps
domain errors to problem responses.
"""

from fastapi import APIRouter

from cloud.api import deployments, devices, fleet, models, rollouts, system
from cloud.api.problems import install_problem_handlers

__all__ = ["install_problem_handlers", "router"]

router = APIRouter()
router.include_router(system.health_router)
_v1 = APIRouter(prefix="/api/v1")
for _resource in (system, models, devices, deployments, fleet, rollouts):
    _v1.include_router(_resource.router)
router.include_router(_v1)
