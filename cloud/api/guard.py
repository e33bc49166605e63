"""A request guard in front of the API: who may send a body, and how large, decided before it is read.

FastAPI reads (and spools to disk) a request body before dependencies run, so a 50 MB upload without a
token used to be received in full and only then answered 401. This ASGI middleware, for every request with
a body, first refuses a declared `Content-Length` above the route's limit (413), then authenticates the
bearer token and checks the route's roles (401/403), all before the app reads a byte; a body without a
declared length is counted while it streams and cut off at the limit (413).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import anyio
from fastapi.routing import APIRoute, iter_route_contexts
from sqlmodel import Session
from starlette.exceptions import HTTPException
from starlette.routing import Match

from cloud.api.deps import RoleCheck
from cloud.api.problems import problem
from cloud.auth import Principal, Role, allowed
from cloud.coordinator import Coordinator
from cloud.services.tokens import authenticate_token

__all__ = ["RequestGuard", "api_routes", "route_roles"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})
_UPLOAD_SLACK = 1024 * 1024  # multipart framing and form fields around an artifact


def api_routes(app: Any) -> list[Any]:
    """Every API route of `app` as FastAPI resolves it (included routers flattened, their dependencies merged)."""
    return [r for r in iter_route_contexts(app.routes) if isinstance(r.original_route, APIRoute)]


def route_roles(route: Any) -> frozenset[Role] | None:
    """The roles a route requires (intersection of its `requires(...)` checks); None for a public route."""
    checks = [d.call for d in route.dependant.dependencies if isinstance(d.call, RoleCheck)]
    if not checks:
        return None
    required: frozenset[Role] = frozenset()
    for check in checks:
        if check.roles:
            required = check.roles if not required else required & check.roles
    return required


class RequestGuard:
    """ASGI middleware: body size and credentials checked before the body is read (see the module docstring)."""

    def __init__(self, app: Callable[[Scope, Receive, Send], Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Refuse early, or pass the request on with a body counter."""
        if scope["type"] != "http" or scope["method"] not in _BODY_METHODS:
            await self.app(scope, receive, send)
            return
        coordinator: Coordinator = scope["app"].state.coordinator
        route = _match(scope)
        limit = _limit(coordinator, route)
        declared = _content_length(scope)
        if declared is not None and declared > limit:
            await _refuse(scope, send, 413, f"request body of {declared} bytes exceeds the limit of {limit} bytes")
            return
        if route is not None and (roles := route_roles(route)) is not None:
            refusal = await _authorize(scope, coordinator, roles)
            if refusal is not None:
                await _refuse(scope, send, *refusal)
                return
        await self.app(scope, _counting(receive, limit), send)


def _match(scope: Scope) -> Any | None:
    app = scope["app"]
    routes = getattr(app.state, "api_routes", None)
    if routes is None:
        routes = app.state.api_routes = api_routes(app)
    for route in routes:
        if route.matches(scope)[0] is Match.FULL:
            return route
    return None


def _limit(coordinator: Coordinator, route: Any | None) -> int:
    settings = coordinator.settings
    form = route is not None and any(p.name == "file" for p in route.dependant.body_params)
    return settings.max_artifact_bytes + _UPLOAD_SLACK if form else settings.max_json_body_bytes


def _content_length(scope: Scope) -> int | None:
    for name, value in scope.get("headers", []):
        if name == b"content-length":
            try:
                return int(value)
            except ValueError:
                return None
    return None


def _bearer(scope: Scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").partition(" ")
            return token.strip() if scheme.lower() == "bearer" and token.strip() else None
    return None


async def _authorize(scope: Scope, coordinator: Coordinator, roles: frozenset[Role]) -> tuple[int, str] | None:
    """None if the bearer token may call the route (the principal is left for the route); else (status, why)."""
    token = _bearer(scope)
    if token is None:
        return 401, "this request needs 'Authorization: Bearer <token>' (an API token or the admin token)"
    principal = await anyio.to_thread.run_sync(_authenticate, coordinator, token)
    if principal is None:
        return 401, "the bearer token is not a valid API token (unknown or revoked)"
    if not allowed(principal.role, roles):
        needed = " or ".join(sorted({r.value for r in roles} | {Role.ADMIN.value}))
        return 403, f"token {principal.name!r} has role {principal.role.value}; this needs {needed}"
    scope.setdefault("state", {})["principal"] = principal
    return None


def _authenticate(coordinator: Coordinator, token: str) -> Principal | None:
    with Session(coordinator.engine) as session:
        return authenticate_token(session=session, presented=token, admin_token=coordinator.admin_token)


async def _refuse(scope: Scope, send: Send, status: int, detail: str) -> None:
    response = problem(status, detail)
    await response(scope, _no_receive, send)


async def _no_receive() -> Message:
    return {"type": "http.disconnect"}


def _counting(receive: Receive, limit: int) -> Receive:
    """`receive` that raises 413 once more than `limit` body bytes have arrived (without reading further)."""
    seen = 0

    async def counted() -> Message:
        nonlocal seen
        message = await receive()
        if message["type"] == "http.request":
            seen += len(message.get("body", b""))
            if seen > limit:
                raise HTTPException(413, f"request body exceeds the limit of {limit} bytes")
        return message

    return counted
