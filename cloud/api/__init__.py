"""The REST API under `/api/v1`, plus `/healthz`; route handlers call services and nothing else."""

from fastapi import APIRouter

from cloud.api import fleet, registry, rollouts, system
from cloud.api.problems import install_problem_handlers

__all__ = ["install_problem_handlers", "router"]

router = APIRouter()
router.include_router(system.health_router)
_v1 = APIRouter(prefix="/api/v1")
_v1.include_router(system.router)
_v1.include_router(registry.router)
_v1.include_router(fleet.router)
_v1.include_router(rollouts.router)
router.include_router(_v1)
