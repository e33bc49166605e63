"""Bodies are judged before they are read: an unauthenticated, under-privileged or oversized upload is refused
without the coordinator reading (or spooling to disk) a byte of it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from sqlmodel import Session

from cloud.auth import Role
from cloud.services.tokens import create_token
from tests.cloud.conftest import Api

UPLOAD = "/api/v1/models/digits/versions"
FIFTY_MB = 50 * 1024 * 1024


def call(api: Api, method: str, path: str, headers: dict[str, str], body: Callable[[], Awaitable[dict[str, Any]]]):  # type: ignore[no-untyped-def]
    """Run one request through the ASGI app directly; returns (status, how many times the body was read)."""
    reads = 0
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        nonlocal reads
        reads += 1
        return await body()

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "http_version": "1.1",
        "method": method,
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "scheme": "http",
        "server": ("127.0.0.1", 8080),
        "client": ("127.0.0.1", 5555),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }
    asyncio.run(api.client.app(scope, receive, send))  # type: ignore[attr-defined]
    start = next(m for m in sent if m["type"] == "http.response.start")
    return start["status"], reads


async def never() -> dict[str, Any]:
    pytest.fail("the body was read")
    raise AssertionError


def token(api: Api, role: Role) -> str:
    with Session(api.coordinator.engine) as session:
        return create_token(session=session, name=f"t-{role.value}", role=role, created_by="test")[0]


def multipart_headers(length: int, auth: str | None = None) -> dict[str, str]:
    headers = {"content-type": "multipart/form-data; boundary=x", "content-length": str(length)}
    return headers | ({"authorization": f"Bearer {auth}"} if auth else {})


def test_unauthenticated_50mb_upload_is_refused_without_reading_it(api: Api) -> None:
    status, reads = call(api, "POST", UPLOAD, multipart_headers(FIFTY_MB), never)
    assert (status, reads) == (401, 0)


def test_viewer_upload_is_refused_without_reading_it(api: Api) -> None:
    status, reads = call(api, "POST", UPLOAD, multipart_headers(FIFTY_MB, token(api, Role.VIEWER)), never)
    assert (status, reads) == (403, 0)


def test_upload_declared_above_the_artifact_limit_is_refused_before_it_is_read(api: Api) -> None:
    limit = api.coordinator.settings.max_artifact_bytes
    status, reads = call(
        api, "POST", UPLOAD, multipart_headers(limit + 10 * 1024 * 1024, token(api, Role.PUBLISHER)), never
    )
    assert (status, reads) == (413, 0)


def test_json_body_above_its_limit_is_refused_before_it_is_read(api: Api) -> None:
    headers = {"content-type": "application/json", "content-length": str(2 * 1024 * 1024)}
    status, reads = call(api, "POST", "/api/v1/enrolment", headers, never)
    assert (status, reads) == (413, 0)


def test_streamed_body_without_length_is_cut_off_at_the_limit(api: Api) -> None:
    chunk = b"x" * (256 * 1024)
    served = 0

    async def endless() -> dict[str, Any]:
        nonlocal served
        served += 1
        if served > 100:  # 25 MB: far past the 1 MiB JSON limit
            pytest.fail("the coordinator kept reading past the limit")
        return {"type": "http.request", "body": chunk, "more_body": True}

    headers = {"content-type": "application/json", "authorization": f"Bearer {token(api, Role.OPERATOR)}"}
    status, reads = call(api, "POST", "/api/v1/deployments", headers, endless)
    assert status == 413
    assert reads <= 1024 * 1024 // len(chunk) + 2
