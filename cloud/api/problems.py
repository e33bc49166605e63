"""Domain errors and validation failures as problem-style JSON (`application/problem+json`)."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from cloud.errors import CloudError, InvalidInputError, RequestError

__all__ = ["install_problem_handlers", "problem"]

_TITLES = {
    400: "Bad Request",
    401: "Unauthorized",
    403: "Forbidden",
    404: "Not Found",
    405: "Method Not Allowed",
    409: "Conflict",
    413: "Content Too Large",
    416: "Range Not Satisfiable",
    422: "Unprocessable Content",
    500: "Internal Server Error",
    503: "Service Unavailable",
}


def problem(status: int, detail: str, **extra: Any) -> JSONResponse:
    """A problem response with a human `detail` line."""
    body = {"type": "about:blank", "title": _TITLES.get(status, "Error"), "status": status, "detail": detail}
    body.update({k: v for k, v in extra.items() if v is not None})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse(body, status_code=status, media_type="application/problem+json", headers=headers)


def _location(loc: tuple[Any, ...] | list[Any]) -> str:
    return ".".join(str(part) for part in loc) or "<request>"


async def _on_validation_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    lines = [f"{_location(err.get('loc', ()))}: {err.get('msg', 'invalid')}" for err in errors[:5]]
    fields = [_location(err.get("loc", ())) for err in errors]
    detail = "invalid request: " + "; ".join(lines)
    return problem(
        422,
        detail,
        field=fields[0] if fields else None,
        errors=[{"field": _location(err.get("loc", ())), "message": err.get("msg", "")} for err in errors],
    )


async def _on_cloud_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, CloudError)
    if isinstance(exc, RequestError):
        field = exc.field if isinstance(exc, InvalidInputError) else None
        return problem(exc.status_code, str(exc), field=field)
    status = 503 if exc.retryable else 500
    return problem(status, str(exc), retryable=exc.retryable)


async def _on_http_error(_request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    return problem(exc.status_code, str(exc.detail))


def install_problem_handlers(app: FastAPI) -> None:
    """Map domain errors and request validation failures to problem responses."""
    app.add_exception_handler(RequestValidationError, _on_validation_error)
    app.add_exception_handler(CloudError, _on_cloud_error)
    app.add_exception_handler(StarletteHTTPException, _on_http_error)
