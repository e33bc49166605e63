"""Telemetry acknowledgements: what the coordinator has stored of a device's telemetry, and when to say so.

`acknowledge_telemetry` settles the device's chain of windows (`cloud.telemetry.gaps`: at most `ACK_SCAN_ROWS`
windows per call, holes reported after their grace period) and reads the highest stored seq (one index lookup;
never below what retention deleted: `TelemetryChain.pruned_seq`) and the reported gaps: a `TelemetryAck` an
agent's outbox can trust (`TelemetryAck.confirms`), and when to walk the chain again (a hole's grace period
ends). `acknowledge_devices` does the same for many devices in one pass, with a handful of statements for all of
them (`cloud.telemetry.gaps.settle_chains`); `acknowledge_telemetry` is that pass for one. `AckThrottle` decides
when the bridge publishes it: at once, unless it acknowledged the device less than
`interval_s` ago; then once that interval is over, so the last window of a burst is always acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import NamedTuple

from sqlmodel import Session, col, select

from cloud.models import Device, EnrolmentState, TelemetryChain
from cloud.telemetry.gaps import GAP_GRACE_S, highest_seqs, reported_missing_of, settle_chains
from protocol.messages import TelemetryAck, utcnow

__all__ = [
    "ACK_SCAN_ROWS",
    "AckThrottle",
    "Acknowledgement",
    "acknowledge_devices",
    "acknowledge_telemetry",
    "recently_heard",
    "telemetry_ack",
]

ACK_SCAN_ROWS = 10_000  # most windows one acknowledgement settles (bounds its cost)


class Acknowledgement(NamedTuple):
    """The acknowledgement to publish, and in how many seconds to compute it again (None: when windows arrive)."""

    ack: TelemetryAck
    recheck_s: float | None


def acknowledge_telemetry(
    session: Session,
    device_id: str,
    *,
    now: datetime | None = None,
    grace_s: float = GAP_GRACE_S,
    commit: bool = True,
) -> Acknowledgement:
    """Settle `device_id`'s chain and say what is stored of its telemetry (`commit=False`: the caller commits)."""
    return acknowledge_devices(session, [device_id], now=now, grace_s=grace_s, commit=commit)[device_id]


def acknowledge_devices(
    session: Session,
    device_ids: Sequence[str],
    *,
    now: datetime | None = None,
    grace_s: float = GAP_GRACE_S,
    commit: bool = True,
) -> dict[str, Acknowledgement]:
    """`acknowledge_telemetry` for each of `device_ids` in one transaction, with a handful of statements for all
    of them (`cloud.telemetry.gaps.settle_chains`); `commit=False`: the caller commits."""
    now = now or utcnow()
    ids = sorted(set(device_ids))
    settled = settle_chains(session, ids, now=now, grace_s=grace_s, scan_rows=ACK_SCAN_ROWS)
    highest = highest_seqs(session, ids)
    pruned = {
        device_id: int(seq)
        for device_id, seq in session.exec(
            select(TelemetryChain.device_id, TelemetryChain.pruned_seq).where(col(TelemetryChain.device_id).in_(ids))
        )
        if seq is not None
    }
    stored: dict[str, tuple[int | None, int]] = {}
    for device_id in ids:
        max_seq = highest.get(device_id)
        if device_id in pruned and (max_seq is None or pruned[device_id] > max_seq):
            max_seq = pruned[device_id]  # every window of the device was old enough to be deleted
        if max_seq is not None:
            seq = settled[device_id].seq
            stored[device_id] = (None if seq is None else min(seq, max_seq), max_seq)
    missing = reported_missing_of(session, [d for d, (seq, _) in stored.items() if seq is not None])
    answers = {}
    for device_id in ids:
        recheck = settled[device_id].recheck_s
        if device_id not in stored:
            answers[device_id] = Acknowledgement(TelemetryAck(device_id=device_id), recheck)
            continue
        stored_seq, max_seq = stored[device_id]
        gaps = missing.get(device_id, []) if stored_seq is not None else []
        ack = TelemetryAck(device_id=device_id, stored_seq=stored_seq, max_seq=max_seq, missing=gaps, at=now)
        answers[device_id] = Acknowledgement(ack, recheck)
    if commit:
        session.commit()
    return answers


def telemetry_ack(
    session: Session, device_id: str, *, now: datetime | None = None, grace_s: float = GAP_GRACE_S
) -> TelemetryAck:
    """What is stored of `device_id`'s telemetry (`acknowledge_telemetry` without the recheck time)."""
    return acknowledge_telemetry(session, device_id, now=now, grace_s=grace_s).ack


class AckThrottle:
    """Per device: acknowledge at most once per `interval_s`, and once more when a burst ends. Time is passed in.

    While the caller is `busy` (a backlog of messages waits) the interval stretches to `busy_interval_s`: each
    acknowledgement costs a chain walk, and an agent resends what is unconfirmed only after 30 s. Not thread-safe:
    the bridge's worker thread owns it.
    """

    def __init__(self, interval_s: float = 1.0, busy_interval_s: float | None = None) -> None:
        self._interval = interval_s
        self._busy_interval = max(interval_s, busy_interval_s or interval_s)
        self._sent: dict[str, float] = {}  # device → when it was last acknowledged
        self._due: dict[str, float] = {}  # device → when its deferred acknowledgement is due
        self._pruned_at = 0.0

    def stored(self, device_id: str, now: float, *, busy: bool = False) -> bool:
        """Something of `device_id` was stored at `now`: True to acknowledge at once, False if deferred."""
        last = self._sent.get(device_id)
        interval = self._busy_interval if busy else self._interval
        if last is None or now - last >= interval:
            self._sent[device_id] = now
            self._due.pop(device_id, None)
            return True
        self._due.setdefault(device_id, last + interval)
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
            # Devices acknowledged longer ago than the (longest) interval decide like unknown ones: forget them.
            self._sent = {d: at for d, at in self._sent.items() if now - at < self._busy_interval}
            self._pruned_at = now
        return ready


def recently_heard(session: Session, within_s: float, *, now: datetime | None = None) -> list[str]:
    """Enrolled devices heard from in the last `within_s` seconds (one query on the device table), sorted."""
    since = (now or utcnow()) - timedelta(seconds=within_s)
    statement = select(Device.id).where(
        col(Device.last_seen) >= since, col(Device.enrolment) == EnrolmentState.ENROLLED
    )
    return sorted(session.exec(statement.order_by(col(Device.id))).all())
