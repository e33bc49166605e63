"""Telemetry acknowledgements: what the coordinator has stored of a device's telemetry, and when to say so.

`acknowledge_telemetry` settles the device's chain of windows (`cloud.telemetry.gaps`: at most `ACK_SCAN_ROWS`
windows per call, holes reported after their grace period) and reads the highest stored seq (one index lookup)
and the reported gaps: a `TelemetryAck` an agent's outbox can trust (`TelemetryAck.confirms`), and when to walk
the chain again (a hole's grace period ends). `AckThrottle` decides when the bridge publishes it: at once,
unless it acknowledged the device less than `interval_s` ago; then once that interval is over, so the last
window of a burst is always acknowledged.
"""

from __future__ import annotations

from datetime import datetime
from typing import NamedTuple

from sqlalchemy import func
from sqlmodel import Session, col, select

from cloud.models import TelemetryRecord
from cloud.telemetry.gaps import GAP_GRACE_S, reported_missing, settle_chain
from protocol.messages import TelemetryAck, utcnow

__all__ = ["ACK_SCAN_ROWS", "AckThrottle", "Acknowledgement", "acknowledge_telemetry", "telemetry_ack"]

ACK_SCAN_ROWS = 10_000  # most windows one acknowledgement settles (bounds its cost)


class Acknowledgement(NamedTuple):
    """The acknowledgement to publish, and in how many seconds to compute it again (None: when windows arrive)."""

    ack: TelemetryAck
    recheck_s: float | None


def acknowledge_telemetry(
    session: Session, device_id: str, *, now: datetime | None = None, grace_s: float = GAP_GRACE_S
) -> Acknowledgement:
    """Settle `device_id`'s chain and say what is stored of its telemetry."""
    now = now or utcnow()
    settled = settle_chain(session, device_id, now=now, grace_s=grace_s, scan_rows=ACK_SCAN_ROWS)
    max_seq = session.exec(
        select(func.max(col(TelemetryRecord.seq))).where(col(TelemetryRecord.device_id) == device_id)
    ).one()
    if max_seq is None:
        return Acknowledgement(TelemetryAck(device_id=device_id), settled.recheck_s)
    stored_seq = None if settled.seq is None else min(settled.seq, max_seq)
    missing = reported_missing(session, device_id) if stored_seq is not None else []
    ack = TelemetryAck(device_id=device_id, stored_seq=stored_seq, max_seq=max_seq, missing=missing, at=now)
    return Acknowledgement(ack, settled.recheck_s)


def telemetry_ack(
    session: Session, device_id: str, *, now: datetime | None = None, grace_s: float = GAP_GRACE_S
) -> TelemetryAck:
    """What is stored of `device_id`'s telemetry (`acknowledge_telemetry` without the recheck time)."""
    return acknowledge_telemetry(session, device_id, now=now, grace_s=grace_s).ack


class AckThrottle:
    """Per device: acknowledge at most once per `interval_s`, and once more when a burst ends. Time is passed in.

    Not thread-safe: the bridge's worker thread owns it.
    """

    def __init__(self, interval_s: float = 1.0) -> None:
        self._interval = interval_s
        self._sent: dict[str, float] = {}  # device → when it was last acknowledged
        self._due: dict[str, float] = {}  # device → when its deferred acknowledgement is due
        self._pruned_at = 0.0

    def stored(self, device_id: str, now: float) -> bool:
        """Something of `device_id` was stored at `now`: True to acknowledge at once, False if deferred."""
        last = self._sent.get(device_id)
        if last is None or now - last >= self._interval:
            self._sent[device_id] = now
            self._due.pop(device_id, None)
            return True
        self._due.setdefault(device_id, last + self._interval)
        return False

    def recheck(self, device_id: str, at: float) -> None:
        """Acknowledge `device_id` again at `at` (a hole's grace period ends), within the throttle's limit."""
        last = self._sent.get(device_id)
        at = at if last is None else max(at, last + self._interval)
        self._due[device_id] = min(at, self._due.get(device_id, at))

    def next_due(self) -> float | None:
        """When the earliest deferred acknowledgement is due; None when none is."""
        return min(self._due.values(), default=None)

    def due(self, now: float) -> list[str]:
        """The devices whose deferred acknowledgement is due at `now` (counted as sent)."""
        ready = [device for device, at in self._due.items() if at <= now]
        for device in ready:
            del self._due[device]
            self._sent[device] = now
        if now - self._pruned_at >= self._interval:
            # Devices acknowledged longer ago than the interval decide like unknown ones: forget them.
            self._sent = {d: at for d, at in self._sent.items() if now - at < self._interval}
            self._pruned_at = now
        return ready
