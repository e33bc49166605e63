"""Counters of what the MQTT bridge received, rejected and dropped, shown by `GET /api/v1/stats`."""

from __future__ import annotations

import threading
from collections import Counter
from typing import Any

__all__ = ["IngestCounters"]


class IngestCounters:
    """Thread-safe counters, keyed by channel (`reported`, `events`, `telemetry`, or `unknown` for bad topics)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._received: Counter[str] = Counter()
        self._stored: Counter[str] = Counter()
        self._rejected: Counter[str] = Counter()
        self._failed: Counter[str] = Counter()
        self._duplicates = 0
        self._published = 0
        self._connects = 0
        self._acks = 0
        self._database_down = False
        self._last_rejection: str | None = None

    def received(self, channel: str, count: int = 1) -> None:
        """`count` messages arrived on `channel`."""
        with self._lock:
            self._received[channel] += count

    def stored(self, channel: str, count: int = 1) -> None:
        """`count` messages were applied to the registry."""
        with self._lock:
            self._stored[channel] += count

    def rejected(self, channel: str, reason: str) -> None:
        """A malformed message or bad topic was dropped."""
        with self._lock:
            self._rejected[channel] += 1
            self._last_rejection = reason[:500]

    def failed(self, channel: str) -> None:
        """A valid message could not be applied and never will be (a bug, or data the database refuses)."""
        with self._lock:
            self._failed[channel] += 1

    def duplicate(self) -> None:
        """A telemetry window already stored was dropped."""
        with self._lock:
            self._duplicates += 1

    def published(self, count: int = 1) -> None:
        """Desired states handed to the broker."""
        with self._lock:
            self._published += count

    def acknowledged(self) -> None:
        """A telemetry acknowledgement was handed to the broker."""
        with self._lock:
            self._acks += 1

    def database(self, *, down: bool) -> None:
        """The bridge is waiting for the database to answer again (`down`), or it answers."""
        with self._lock:
            self._database_down = down

    def connected(self) -> None:
        """The bridge (re)connected."""
        with self._lock:
            self._connects += 1

    def snapshot(self) -> dict[str, Any]:
        """A JSON-ready copy of the counters."""
        with self._lock:
            return {
                "received": dict(self._received),
                "stored": dict(self._stored),
                "rejected": dict(self._rejected),
                "rejected_total": sum(self._rejected.values()),
                "failed": dict(self._failed),
                "duplicates_dropped": self._duplicates,
                "desired_published": self._published,
                "connects": self._connects,
                "acks_published": self._acks,
                "database_down": self._database_down,
                "last_rejection": self._last_rejection,
            }
