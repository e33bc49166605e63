"""Artifact downloads over HTTP(S): streamed into a `.part` file, bounded in time, size and attempts.

Downloads resume: a `.part` left by a dropped connection or an agent restart is continued with
`Range: bytes=N-`. A `206` whose `Content-Range` starts at N is appended; a server that ignores Range
(`200`) sends the whole file, which replaces the part; `416` (the part is longer than the server's
file) starts over from byte 0. A body that ends before the declared size is a transient failure, and
the next attempt resumes where it stopped.

A server cannot hold an update hostage: more bytes than declared stop the download at once (endless
data), and an attempt that has not finished within `timeout_s + remaining / min_rate_bps` seconds is
cut (slow retrieval: a trickle of bytes never trips the per-read timeout); the next attempt resumes.

A coordinator with `artifact_base_url` answers 307 to object storage or a CDN: redirects are followed to https,
or to http from http, never from https down to http, and credentials do not cross origins. The bytes are
trusted only after the verifying step checks the sha256 (and TUF targets), so a cache cannot substitute them.

The standard library does the HTTP (`urllib.request`, which the agent has loaded anyway): proxies from the
environment (`HTTPS_PROXY`, `NO_PROXY`, ...) as before, https verified against certifi's bundle (or `SSL_CERT_FILE` /
`SSL_CERT_DIR` when set), and no compressed encodings, so a Range counts the artifact's own bytes. httpx is not
loaded by an agent that only downloads (~2 MiB resident).
"""

from __future__ import annotations

import http.client
import logging
import os
import ssl
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.error import HTTPError
from urllib.parse import urljoin, urlsplit

from agent.errors import ArtifactVerificationError, DownloadError, StorageError
from agent.update.cancel import StepCancelledError
from protocol import ErrorCode

__all__ = ["ArtifactFetcher", "DownloadCancelledError"]

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
_READ = 64 * 1024
# What a dropped, reset, timed-out or garbled connection raises (`URLError`, `socket.timeout` and `ssl.SSLError` are
# `OSError`s; `IncompleteRead` and a bad status line are `HTTPException`s).
_NETWORK_ERRORS = (OSError, http.client.HTTPException)


class DownloadCancelledError(StepCancelledError):
    """The download was abandoned on purpose (agent stopping, or a newer desired state); not a failure."""


class _ClientError(DownloadError):
    """A client error (4xx): asking again gets the same answer, so it is not retried."""


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hands every 3xx back as an `HTTPError`: `ArtifactFetcher._stream` checks each hop itself."""

    def redirect_request(self, *_args: object, **_kwargs: object) -> None:
        return None


def _tls_context() -> ssl.SSLContext:
    """Verified TLS: certifi's CA bundle (as httpx used), or the system's with `SSL_CERT_FILE` / `SSL_CERT_DIR` set."""
    if os.environ.get("SSL_CERT_FILE") or os.environ.get("SSL_CERT_DIR"):
        return ssl.create_default_context()
    try:
        import certifi
    except ImportError:  # not installed: the system's store
        return ssl.create_default_context()
    return ssl.create_default_context(cafile=certifi.where())


class _VerifiedHttps(urllib.request.HTTPSHandler):
    """HTTPS verified with `_tls_context()`, made on the first https request and kept for the next ones.

    The first TLS context of a process costs ~2 MiB resident that stays (OpenSSL's set-up, then the CA bundle): an
    agent whose artifacts come over http never pays it. (`HTTPSHandler.__init__` is skipped: from Python 3.12 it
    makes a default context itself.)
    """

    def __init__(self) -> None:
        urllib.request.AbstractHTTPHandler.__init__(self)
        self._tls: ssl.SSLContext | None = None

    def https_open(self, req: urllib.request.Request) -> http.client.HTTPResponse:
        if self._tls is None:  # one downloading thread; two contexts made at once would both be right anyway
            self._tls = _tls_context()
        return self.do_open(http.client.HTTPSConnection, req, context=self._tls)


class ArtifactFetcher:
    """Downloads artifacts over HTTP(S); relative URLs resolve against the coordinator."""

    def __init__(
        self,
        *,
        timeout_s: float,
        attempts: int,
        min_rate_bps: int = 16384,
        base_url: str | None = None,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        # Redirects are followed by `_stream`, which checks each hop (no downgrade to http, no credentials across).
        self._opener: urllib.request.OpenerDirector | None = None
        self._attempts = attempts
        self._timeout_s = timeout_s
        self._min_rate_bps = min_rate_bps
        self._base_url = base_url
        # `sleep(seconds)` returns True when the wait was interrupted (agent stopping).
        self._sleep = sleep

    def close(self) -> None:
        """Nothing stays open between downloads (each response is closed when read); kept for the callers."""
        self._opener = None

    def _open(self, url: str, headers: dict[str, str]) -> http.client.HTTPResponse:
        """The response to GET `url`, whatever its status; `DownloadError` when there is none (network, TLS)."""
        if urlsplit(url).scheme not in ("http", "https"):
            raise _ClientError(f"GET {url}: only http and https artifact URLs are fetched")
        if self._opener is None:  # built on the first download (the TLS context on the first https one)
            self._opener = urllib.request.OpenerDirector()
            for handler in (
                urllib.request.ProxyHandler(),  # HTTP(S)_PROXY / NO_PROXY from the environment
                urllib.request.HTTPHandler(),
                _VerifiedHttps(),
                urllib.request.HTTPDefaultErrorHandler(),
                urllib.request.HTTPErrorProcessor(),
                _NoRedirects(),
            ):
                self._opener.add_handler(handler)
        request = urllib.request.Request(url, headers=headers, method="GET")
        try:
            response: http.client.HTTPResponse = self._opener.open(request, timeout=self._timeout_s)
        except HTTPError as answer:  # a 3xx, 4xx or 5xx is an answer: its status and headers decide
            return answer  # type: ignore[return-value]  # an HTTPError is the response (status, headers, read)
        except (ValueError, *_NETWORK_ERRORS) as exc:  # ValueError: a URL urllib cannot use
            reason = getattr(exc, "reason", exc)
            raise DownloadError(f"GET {url} failed: {type(reason).__name__}: {reason}") from exc
        return response

    def resolve(self, url: str) -> str:
        """`url`, or `url` joined onto the coordinator URL when it is relative."""
        if "://" in url or self._base_url is None:
            return url
        return urljoin(self._base_url + "/", url.lstrip("/"))

    def fetch(self, url: str, dest: Path, *, expected_size: int, cancelled: Callable[[], bool]) -> None:
        """Download `url` to `dest`, retrying transient failures; `DownloadError` after the last attempt."""
        url = self.resolve(url)
        for attempt in range(1, self._attempts + 1):
            try:
                self._fetch_once(url, dest, expected_size, cancelled)
                return
            except DownloadError as exc:
                if attempt == self._attempts or isinstance(exc, _ClientError):
                    raise
                delay = min(0.5 * 2 ** (attempt - 1), 10.0)
                log.warning(
                    "download of %s failed (%s); attempt %d/%d in %.1fs", url, exc, attempt + 1, self._attempts, delay
                )
                if self._sleep is not None and self._sleep(delay):
                    raise DownloadCancelledError("agent stopping") from exc

    def _fetch_once(self, url: str, dest: Path, expected_size: int, cancelled: Callable[[], bool]) -> None:
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            have = dest.stat().st_size if dest.exists() else 0
            if have > expected_size:
                dest.unlink()
                have = 0
        except OSError as exc:
            raise StorageError(f"cannot prepare {dest}: {exc}") from exc
        if have == expected_size and have > 0:
            return  # complete from an earlier attempt; the verifying step decides whether it is right
        headers = {"Range": f"bytes={have}-"} if have else {}
        deadline = time.monotonic() + self._timeout_s + (expected_size - have) / self._min_rate_bps
        try:
            with self._stream(url, headers) as response:
                offset = self._offset(url, response, have, dest)
                received = self._write(url, response, dest, offset, expected_size, cancelled, deadline)
        except OSError as exc:  # the file's: network errors are `DownloadError`s by now
            raise StorageError(f"cannot write {dest}: {exc}") from exc
        if received < expected_size:
            raise DownloadError(f"GET {url} ended after {received} of {expected_size} bytes; the next attempt resumes")

    @contextmanager
    def _stream(self, url: str, headers: dict[str, str]) -> Iterator[http.client.HTTPResponse]:
        """GET `url` streamed, following up to 5 redirects (a coordinator sends devices to a CDN) by `_next_hop`."""
        for _ in range(_MAX_REDIRECTS + 1):
            response = self._open(url, headers)
            try:
                location = response.headers.get("location")
                if response.status not in _REDIRECTS or location is None:
                    yield response
                    return
                target = _next_hop(url, location)
            finally:
                response.close()
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
            log.debug("GET %s redirected to %s", url, target)
            url = target
        raise _ClientError(f"GET {url} redirected more than {_MAX_REDIRECTS} times")

    @staticmethod
    def _offset(url: str, response: http.client.HTTPResponse, have: int, dest: Path) -> int:
        """Where the response body starts in the file: `have` for a matching 206, 0 for a 200."""
        status = response.status
        if status == 200:
            if have:
                log.info("%s ignored the Range request; downloading from byte 0", url)
            return 0
        if status == 206 and have and _range_start(response.headers.get("content-range")) == have:
            return have
        if status in (206, 416):
            # A range we did not ask for, or our part is longer than the server's file: start over.
            dest.unlink(missing_ok=True)
            raise DownloadError(f"GET {url} answered {status} to bytes={have}-; restarting from byte 0")
        message = f"GET {url} answered {status} {response.reason}"
        transient = status >= 500 or status in (408, 429)
        raise DownloadError(message) if transient else _ClientError(message)

    @staticmethod
    def _write(
        url: str,
        response: http.client.HTTPResponse,
        dest: Path,
        offset: int,
        expected_size: int,
        cancelled: Callable[[], bool],
        deadline: float,
    ) -> int:
        received = offset
        with dest.open("r+b" if offset else "wb") as out:
            out.seek(offset)
            out.truncate()
            for chunk in _body(url, response):  # as they arrive: the part holds what was received
                if cancelled():
                    raise DownloadCancelledError(f"download of {url} cancelled at byte {received}")
                received += len(chunk)
                if received > expected_size:
                    # Stop an endless or oversized stream before it fills the disk.
                    out.close()
                    dest.unlink(missing_ok=True)
                    raise ArtifactVerificationError(
                        f"artifact at {url} is larger than the declared {expected_size} bytes",
                        code=ErrorCode.ARTIFACT_SIZE_MISMATCH,
                    )
                out.write(chunk)
                out.flush()  # the bytes reach the OS at once, so a killed agent resumes from them
                if time.monotonic() > deadline:
                    raise DownloadError(
                        f"GET {url} is slower than the minimum rate (received {received} of {expected_size} bytes "
                        "before the deadline); the next attempt resumes"
                    )
        return received


def _body(url: str, response: http.client.HTTPResponse) -> Iterator[bytes]:
    """The body's bytes as they arrive; a dropped or timed-out connection is a `DownloadError` (the next attempt
    resumes), told apart from the `OSError`s of writing the file."""
    while True:
        try:
            chunk = response.read1(_READ)
        except _NETWORK_ERRORS as exc:
            raise DownloadError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
        if not chunk:
            return
        yield chunk


def _next_hop(url: str, location: str) -> str:
    """The absolute redirect target: https anywhere, or http from http; a downgrade from https is refused.

    The digest check makes a redirect harmless to integrity, but https -> http would hand the download (and
    what it reveals about the fleet) to anyone on the path: a coordinator or CDN misconfigured that way is told.
    """
    target = urljoin(url, location)
    scheme, source = urlsplit(target).scheme, urlsplit(url).scheme
    if scheme == "https" or (scheme == "http" and source == "http"):
        return target
    raise _ClientError(f"GET {url} redirected to {target!r}: only https, or http from http, is followed")


def _origin(url: str) -> tuple[str, str | None, int | None]:
    """Scheme, host and port: where credentials may go."""
    parts = urlsplit(url)
    return parts.scheme, parts.hostname, parts.port


def _range_start(content_range: str | None) -> int | None:
    """The first byte of `Content-Range: bytes 100-999/1000`, or None when it is missing or malformed."""
    if not content_range:
        return None
    unit, _, spec = content_range.strip().partition(" ")
    first, dash, _rest = spec.partition("-")
    if unit.lower() != "bytes" or not dash or not first.isdigit():
        return None
    return int(first)
