"""FastAPI dependencies: the coordinator, a database session per request, and who is calling with which role.

Every route of `/api/v1` states the roles it needs with `requires(...)` (reads: `requires()`, any valid
token); `tests/cloud/test_route_roles.py` walks every route and checks each role against it.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated, Any

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from cloud.auth import Principal, Role, allowed
from cloud.coordinator import Coordinator
from cloud.errors import ForbiddenError, UnauthorizedError
from cloud.services.tokens import authenticate_token

__all__ = [
    "CoordinatorDep",
    "PrincipalDep",
    "RoleCheck",
    "SessionDep",
    "get_coordinator",
    "get_principal",
    "get_session",
    "requires",
]

_bearer = HTTPBearer(auto_error=False, description="An API token (`edgefleet tokens create`) or the admin token.")


def get_coordinator(request: Request) -> Coordinator:
    """The running coordinator of this app."""
    coordinator: Coordinator = request.app.state.coordinator
    return coordinator


CoordinatorDep = Annotated[Coordinator, Depends(get_coordinator)]


def get_session(coordinator: CoordinatorDep) -> Iterator[Session]:
    """A database session for one request."""
    with Session(coordinator.engine, expire_on_commit=False) as session:
        yield session


SessionDep = Annotated[Session, Depends(get_session)]


def get_principal(
    request: Request,
    coordinator: CoordinatorDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    """Who calls: the token's name and role; `UnauthorizedError` without a valid token."""
    cached = getattr(request.state, "principal", None)
    if isinstance(cached, Principal):
        return cached
    if credentials is None:
        raise UnauthorizedError(
            "this request needs 'Authorization: Bearer <token>' (an API token from `edgefleet tokens create`, "
            "or the admin token in the coordinator's data_dir/admin-token)"
        )
    with Session(coordinator.engine) as session:
        principal = authenticate_token(
            session=session, presented=credentials.credentials, admin_token=coordinator.admin_token
        )
    if principal is None:
        raise UnauthorizedError("the bearer token is not a valid API token (unknown or revoked)")
    request.state.principal = principal
    return principal


PrincipalDep = Annotated[Principal, Depends(get_principal)]


class RoleCheck:
    """A dependency that admits callers whose role is one of `roles` (or admin; empty: any valid token)."""

    def __init__(self, roles: frozenset[Role]) -> None:
        self.roles = roles

    def __call__(self, principal: PrincipalDep) -> Principal:
        """The caller, if its role may call this route; `ForbiddenError` otherwise."""
        if not allowed(principal.role, self.roles):
            needed = " or ".join(sorted({r.value for r in self.roles} | {Role.ADMIN.value}))
            raise ForbiddenError(f"token {principal.name!r} has role {principal.role.value}; this needs {needed}")
        return principal


def requires(*roles: Role) -> Any:
    """`dependencies=[requires(Role.OPERATOR)]`: the route needs one of `roles` (admin always may)."""
    return Depends(RoleCheck(frozenset(roles)))
