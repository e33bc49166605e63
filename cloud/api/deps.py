"""FastAPI dependencies: the coordinator, a database session per request, and the admin check for writes."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlmodel import Session

from cloud.auth import token_matches
from cloud.coordinator import Coordinator
from cloud.errors import UnauthorizedError

__all__ = ["AdminDep", "CoordinatorDep", "SessionDep", "get_coordinator", "get_session", "require_admin"]

_bearer = HTTPBearer(auto_error=False, description="The admin token from data_dir/admin-token.")


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


def require_admin(
    coordinator: CoordinatorDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> None:
    """Reject a write without `Authorization: Bearer <admin token>`."""
    if credentials is None:
        raise UnauthorizedError(
            "this request changes the registry and needs 'Authorization: Bearer <admin token>' "
            "(the token is in the coordinator's data_dir/admin-token)"
        )
    if not token_matches(credentials.credentials, coordinator.admin_token):
        raise UnauthorizedError("the bearer token is not the coordinator's admin token")


AdminDep = Depends(require_admin)
