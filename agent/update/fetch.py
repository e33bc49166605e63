"""Artifact downloads over HTTP(S): streamed into a `.part` file, bounded in time, size and attempts."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urljoin

import httpx

from agent.errors import ArtifactVerificationError, DownloadError, StorageError
from agent.update.cancel import StepCancelledError
from protocol import ErrorCode

__all__ = ["ArtifactFetcher", "DownloadCancelledError"]

log = logging.getLogger(__name__)
_CHUNK = 256 * 1024


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
        base_url: str | None = None,
        sleep: Callable[[float], bool] | None = None,
    ) -> None:
        self._client = httpx.Client(timeout=timeout_s, follow_redirects=True)
        self._attempts = attempts
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
        dest.parent.mkdir(parents=True, exist_ok=True)
        received = 0
        try:
            with self._client.stream("GET", url) as response, dest.open("wb") as out:
                if response.status_code != 200:
                    message = f"GET {url} answered {response.status_code} {response.reason_phrase}"
                    transient = response.status_code >= 500 or response.status_code in (408, 429)
                    raise DownloadError(message) if transient else _ClientError(message)
                for chunk in response.iter_bytes(_CHUNK):
                    if cancelled():
                        raise DownloadCancelledError(f"download of {url} cancelled")
                    received += len(chunk)
                    if received > expected_size:
                        # Stop an endless or oversized stream before it fills the disk.
                        raise ArtifactVerificationError(
                            f"artifact at {url} is larger than the declared {expected_size} bytes",
                            code=ErrorCode.ARTIFACT_SIZE_MISMATCH,
                        )
                    out.write(chunk)
        except httpx.HTTPError as exc:
            raise DownloadError(f"GET {url} failed: {type(exc).__name__}: {exc}") from exc
        except OSError as exc:
            raise StorageError(f"cannot write {dest}: {exc}") from exc
