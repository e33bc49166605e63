"""ASGI guards in front of the inference endpoint: a bearer token, and a cap on the request body size.

Both refuse in the endpoint's `{"error": ...}` shape without reading the body, and close the connection,
so that a refused body is never drained: uvicorn stops reading a request whose app does not receive it.
"""

from __future__ import annotations

import hmac
import json
from collections.abc import Iterable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

__all__ = ["BodyLimit", "TokenAuth"]


async def _refuse(send: Send, status: int, message: str, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    body = json.dumps({"error": message}).encode("utf-8")
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode("ascii")),
                (b"connection", b"close"),  # the rest of the body, if any, is never read
                *headers,
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope["headers"]:
        if key.lower() == name:
            return bytes(value)
    return None


class _BodyTooLargeError(Exception):
    """The body being received crossed the limit (raised out of `receive`, answered by `BodyLimit`)."""


class BodyLimit:
    """Answers 413 to a body over `max_bytes`: from Content-Length before reading, else once the stream crosses it."""

    def __init__(self, app: ASGIApp, *, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self, size: str) -> str:
        return (
            f"request body of {size} bytes is over this endpoint's limit of {self.max_bytes} bytes; "
            "send fewer rows per request (the device's operator sets http_max_request_bytes)"
        )

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _header(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await _refuse(send, 413, self._too_large(declared.decode("ascii")))
            return
        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise _BodyTooLargeError
            return message

        async def watched_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, watched_send)
        except _BodyTooLargeError:
            if started:
                raise
            await _refuse(send, 413, self._too_large(f"more than {self.max_bytes}"))


class TokenAuth:
    """Requires `Authorization: Bearer <token>` on every path but `open_paths`; 401 otherwise."""

    def __init__(self, app: ASGIApp, *, token: str, open_paths: Iterable[str]) -> None:
        self.app = app
        self._expected = b"bearer " + token.encode("utf-8")
        self._open = frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        given = _header(scope, b"authorization")
        if given is None:
            problem = "this endpoint needs an 'Authorization: Bearer <token>' header (the device's http_token)"
        elif not self._matches(given):
            problem = "the bearer token is wrong; use the device's http_token"
        else:
            await self.app(scope, receive, send)
            return
        await _refuse(send, 401, problem, [(b"www-authenticate", b"Bearer")])

    def _matches(self, given: bytes) -> bool:
        scheme, _, token = given.partition(b" ")
        # compare_digest takes as long for a near miss as for a wild guess: the token cannot be guessed byte by byte
        return hmac.compare_digest(scheme.lower() + b" " + token.strip(), self._expected)
