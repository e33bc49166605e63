"""Counters of what the MQTT bridge received, rejected and dropped, shown by `GET /api/v1/stats`."""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Mapping
from typing import Any

__all__ = ["IngestCounters", "since"]


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

    def add(self, delta: Mapping[str, Any]) -> None:
        """Add another bridge's counts (`since()` of its snapshots: an ingest process of this coordinator)."""
        with self._lock:
            for key, counter in (
                ("received", self._received),
                ("stored", self._stored),
                ("rejected", self._rejected),
                ("failed", self._failed),
            ):
                counter.update({str(k): int(v) for k, v in dict(delta.get(key) or {}).items()})
            self._duplicates += int(delta.get("duplicates_dropped") or 0)
            self._acks += int(delta.get("acks_published") or 0)
            self._connects += int(delta.get("connects") or 0)
            if delta.get("last_rejection"):
                self._last_rejection = str(delta["last_rejection"])[:500]

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


def since(now: Mapping[str, Any], before: Mapping[str, Any]) -> dict[str, Any]:
    """The counts of snapshot `now` not in the earlier snapshot `before` of the same counters (for `add`). Pure."""
    delta: dict[str, Any] = {}
    for key in ("received", "stored", "rejected", "failed"):
        grown = Counter(dict(now.get(key) or {}))
        grown.subtract(dict(before.get(key) or {}))
        delta[key] = {k: v for k, v in grown.items() if v}
    for key in ("duplicates_dropped", "acks_published", "connects"):
        delta[key] = int(now.get(key) or 0) - int(before.get(key) or 0)
    if now.get("last_rejection") != before.get("last_rejection"):
        delta["last_rejection"] = now.get("last_rejection")
    return delta
