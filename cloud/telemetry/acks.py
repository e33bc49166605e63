"""Telemetry acknowledgements: what the coordinator has stored of a device's telemetry, and when to say so.

`telemetry_ack` reads it from the database: the highest stored seq (one index lookup) and the end of the
contiguous run of stored seqs, continued from the previous acknowledgement's (an index range scan over the
seqs stored since, at most `ACK_SCAN_ROWS`). `AckThrottle` decides when the bridge publishes it: at once,
unless it acknowledged the device less than `interval_s` ago; then once that interval is over, so the last
window of a burst is always acknowledged.
"""

from __future__ import annotations

from sqlalchemy import and_, exists, func
from sqlalchemy.orm import aliased
from sqlmodel import Session, col, select

from cloud.models import TelemetryRecord
from protocol.messages import TelemetryAck

__all__ = ["ACK_SCAN_ROWS", "AckThrottle", "telemetry_ack"]

ACK_SCAN_ROWS = 10_000  # most seqs one acknowledgement moves `stored_seq` forward (bounds its cost)
_MAX_SEQ = 2**63 - 1


def telemetry_ack(session: Session, device_id: str, floor: int | None = None) -> TelemetryAck:
    """What is stored of `device_id`'s telemetry; `floor`: a stored seq up to which every seq is known stored."""
    max_seq = session.exec(
        select(func.max(col(TelemetryRecord.seq))).where(col(TelemetryRecord.device_id) == device_id)
    ).one()
    if max_seq is None:
        return TelemetryAck(device_id=device_id)
    if floor is None or floor > max_seq:
        floor = session.exec(
            select(func.min(col(TelemetryRecord.seq))).where(col(TelemetryRecord.device_id) == device_id)
        ).one()
    return TelemetryAck(device_id=device_id, stored_seq=_run_end(session, device_id, floor), max_seq=max_seq)


def _run_end(session: Session, device_id: str, floor: int) -> int:
    """The highest seq S such that every seq from `floor` (stored) to S is stored, looking `ACK_SCAN_ROWS` ahead."""
    ceiling = min(floor + ACK_SCAN_ROWS, _MAX_SEQ)
    seq = col(TelemetryRecord.seq)
    following = aliased(TelemetryRecord)
    has_next = exists().where(and_(col(following.device_id) == device_id, col(following.seq) == seq + 1))
    statement = (
        select(seq)
        .where(col(TelemetryRecord.device_id) == device_id, seq >= floor, seq < ceiling, ~has_next)
        .order_by(seq)
        .limit(1)
    )
    end = session.exec(statement).first()
    # None: every seq in [floor, ceiling) has its successor stored, so the run reaches at least `ceiling`.
    return ceiling if end is None else int(end)


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
