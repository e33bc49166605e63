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
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urljoin, urlsplit

import httpx

from agent.errors import ArtifactVerificationError, DownloadError, StorageError
from agent.update.cancel import StepCancelledError
from protocol import ErrorCode

__all__ = ["ArtifactFetcher", "DownloadCancelledError"]

log = logging.getLogger(__name__)

_MAX_REDIRECTS = 5
_CREDENTIAL_HEADERS = frozenset({"authorization", "cookie", "proxy-authorization"})


class DownloadCancelledError(StepCancelledError):
    """The download was abandoned on purpose (agent stopping, or a newer desired state); not a failure."""


class _ClientError(DownloadError):
    """A client error (4xx): asking again gets the same answer, so it is not retried."""


class ArtifactFetcher:
    """Downloads artifacts with one pooled `httpx.Client`; relative URLs resolve against the coordinator."""

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
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=False)
        self._attempts = attempts
        self._timeout_s = timeout_s
        self._min_rate_bps = min_rate_bps
        self._base_url = base_url
        # `sleep(seconds)` returns True when the wait was interrupted (agent stopping).
        self._sleep = sleep

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()

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
        except httpx.HTTPError as exc:
            raise DownloadError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc}") from exc
        if received < expected_size:
            raise DownloadError(f"GET {url} ended after {received} of {expected_size} bytes; the next attempt resumes")

    @contextmanager
    def _stream(self, url: str, headers: dict[str, str]) -> Iterator[httpx.Response]:
        """GET `url` streamed, following up to 5 redirects (a coordinator sends devices to a CDN) by `_next_hop`."""
        for _ in range(_MAX_REDIRECTS + 1):
            response = self._client.send(self._client.build_request("GET", url, headers=headers), stream=True)
            try:
                if not response.is_redirect:
                    yield response
                    return
                target = _next_hop(url, response.headers["location"])
            finally:
                response.close()
            if _origin(target) != _origin(url):
                headers = {k: v for k, v in headers.items() if k.lower() not in _CREDENTIAL_HEADERS}
            log.debug("GET %s redirected to %s", url, target)
            url = target
        raise _ClientError(f"GET {url} redirected more than {_MAX_REDIRECTS} times")

    @staticmethod
    def _offset(url: str, response: httpx.Response, have: int, dest: Path) -> int:
        """Where the response body starts in the file: `have` for a matching 206, 0 for a 200."""
        status = response.status_code
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
        message = f"GET {url} answered {status} {response.reason_phrase}"
        transient = status >= 500 or status in (408, 429)
        raise DownloadError(message) if transient else _ClientError(message)

    @staticmethod
    def _write(
        url: str,
        response: httpx.Response,
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
            for chunk in response.iter_bytes():  # as they arrive: the part holds what was received
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
