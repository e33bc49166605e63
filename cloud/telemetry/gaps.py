"""Telemetry gaps: settling each device's chain of windows, reporting holes that outlive a grace period.

`settle_chain` walks the stored windows above the device's settled seq (`cloud.telemetry.chain`, at most
`scan_rows` per call). A hole it meets is pending first (one `TelemetryGap` row without `reported_at`); while the
grace period runs, the device's outbox resends what it has and the hole usually fills. Once the grace period is
over the hole is reported (`reported_at`, a `telemetry.gap` device event) and the chain settles past it. A late
window inside a reported gap shrinks it (`window_stored`); a gap filled entirely is deleted with a
`telemetry.gap_filled` event. The windows a device says it dropped are kept per device, with an event when the
count grows.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime
from typing import NamedTuple

from sqlmodel import Session, col, select

from cloud.models import DeviceEventRecord, TelemetryChain, TelemetryGap, TelemetryGapsPublic, TelemetryRecord, as_utc
from cloud.telemetry.chain import Hole, split_range, walk_chain
from protocol.messages import MAX_ACK_MISSING, SeqRange, TelemetryWindow

__all__ = [
    "GAP_GRACE_S",
    "MAX_GAP_RANGES",
    "TELEMETRY_DROPPED",
    "TELEMETRY_GAP",
    "TELEMETRY_GAP_FILLED",
    "Settled",
    "reported_missing",
    "settle_chain",
    "telemetry_health",
    "window_stored",
    "windows_stored",
]

log = logging.getLogger(__name__)

GAP_GRACE_S = 120.0  # longer than an agent's resend interval (30 s): a window the agent still has is resent first
MAX_GAP_RANGES = 50  # newest gap ranges shown per device
TELEMETRY_GAP = "telemetry.gap"
TELEMETRY_GAP_FILLED = "telemetry.gap_filled"
TELEMETRY_DROPPED = "telemetry.dropped"
_PAGE = 1000


class Settled(NamedTuple):
    """Where a device's chain is settled, and in how many seconds to walk it again (None: when windows arrive)."""

    seq: int | None
    recheck_s: float | None


def settle_chain(
    session: Session, device_id: str, *, now: datetime, grace_s: float, scan_rows: int, commit: bool = True
) -> Settled:
    """Walk `device_id`'s chain forward (at most `scan_rows` windows), reporting holes older than `grace_s`.

    `commit=False` leaves the changes to the caller's transaction (several devices settled with one commit)."""
    chain = session.get(TelemetryChain, device_id)
    start = settled = chain.settled_seq if chain is not None else None
    pending = session.exec(
        select(TelemetryGap).where(TelemetryGap.device_id == device_id, col(TelemetryGap.reported_at).is_(None))
    ).first()
    scanned, recheck, walked_all = 0, None, False
    while True:
        limit = min(_PAGE, scan_rows - scanned)
        if limit <= 0:
            recheck = 0.0  # more to walk than one call may: again soon
            break
        links = _links_above(session, device_id, settled, limit)
        walk = walk_chain(settled, links)
        settled, scanned, hole = walk.settled, scanned + walk.walked, walk.hole
        if hole is None:
            if len(links) < limit:
                walked_all = True
                break
            continue
        age = _age(pending, hole, now)
        if pending is None or age < grace_s:
            detected = now if pending is None or age == 0 else pending.detected_at
            pending = _keep_pending(session, pending, device_id, hole, detected)
            recheck = grace_s - age
            break
        _report(session, pending, hole, now, grace_s)
        pending, settled, scanned = None, hole.before, scanned + 1
    if walked_all and pending is not None:  # its windows arrived
        log.info("telemetry hole filled device=%s seqs=%d..%d", device_id, pending.first_seq, pending.last_seq)
        session.delete(pending)
    if settled != start:
        chain = chain or TelemetryChain(device_id=device_id)
        chain.settled_seq = settled
        session.add(chain)
    if commit:
        session.commit()
    else:
        session.flush()
    return Settled(settled, recheck)


def _links_above(session: Session, device_id: str, settled: int | None, limit: int) -> list[tuple[int, int | None]]:
    seq = col(TelemetryRecord.seq)
    statement = select(seq, col(TelemetryRecord.prev_seq)).where(col(TelemetryRecord.device_id) == device_id)
    if settled is not None:
        statement = statement.where(seq > settled)
    return [(int(s), None if p is None else int(p)) for s, p in session.exec(statement.order_by(seq).limit(limit))]


def _age(pending: TelemetryGap | None, hole: Hole, now: datetime) -> float:
    """Seconds since `hole` was first seen: 0 when the pending row is another hole (disjoint) or none."""
    if pending is None or pending.last_seq < hole.first or pending.first_seq > hole.last:
        return 0.0
    detected = as_utc(pending.detected_at) or now
    return max(1e-6, (now - detected).total_seconds())


def _keep_pending(
    session: Session, pending: TelemetryGap | None, device_id: str, hole: Hole, detected_at: datetime
) -> TelemetryGap:
    row = pending or TelemetryGap(device_id=device_id, first_seq=hole.first, last_seq=hole.last)
    if pending is None or (row.first_seq, row.last_seq) != (hole.first, hole.last):
        log.info("telemetry hole device=%s seqs=%d..%d (waiting for the windows)", device_id, hole.first, hole.last)
    row.first_seq, row.last_seq, row.detected_at = hole.first, hole.last, detected_at
    session.add(row)
    return row


def _report(session: Session, pending: TelemetryGap, hole: Hole, now: datetime, grace_s: float) -> None:
    pending.first_seq, pending.last_seq, pending.reported_at = hole.first, hole.last, now
    session.add(pending)
    span = f"{hole.first}" if hole.windows == 1 else f"{hole.first}..{hole.last}"
    message = f"telemetry window{'s' if hole.windows > 1 else ''} {span} never arrived within {grace_s:g}s: lost"
    session.add(DeviceEventRecord(device_id=pending.device_id, kind=TELEMETRY_GAP, message=message))
    log.warning("telemetry gap device=%s: %s", pending.device_id, message)


def window_stored(session: Session, window: TelemetryWindow) -> None:
    """A window was stored: shrink the reported gap it was in, record a higher dropped count. Commits."""
    if windows_stored(session, [window]):
        session.commit()


def windows_stored(session: Session, windows: Sequence[TelemetryWindow]) -> bool:
    """Windows were stored (each for the first time): shrink the reported gaps they were in, record higher
    dropped counts; one query per batch when nothing changes. Not committed; True if something changed."""
    if not windows:
        return False
    seqs: dict[str, list[int]] = {}
    for window in windows:
        seqs.setdefault(window.device_id, []).append(window.seq)
    statement = select(TelemetryGap).where(
        col(TelemetryGap.device_id).in_(list(seqs)),
        col(TelemetryGap.reported_at).is_not(None),
        col(TelemetryGap.first_seq) <= max(max(v) for v in seqs.values()),
        col(TelemetryGap.last_seq) >= min(min(v) for v in seqs.values()),
    )
    changed = False
    for gap in list(session.exec(statement)):
        inside = [seq for seq in seqs[gap.device_id] if gap.first_seq <= seq <= gap.last_seq]
        if inside:
            _shrink(session, gap, inside)
            changed = True
    most: dict[str, TelemetryWindow] = {}
    for window in windows:
        if window.dropped_windows > 0 and window.dropped_windows > getattr(
            most.get(window.device_id), "dropped_windows", 0
        ):
            most[window.device_id] = window
    for window in most.values():
        changed = _dropped(session, window) or changed
    return changed


def _shrink(session: Session, gap: TelemetryGap, arrived: list[int]) -> None:
    left = split_range(gap.first_seq, gap.last_seq, arrived)
    if not left:
        span = f"{arrived[0]}" if len(arrived) == 1 else f"{min(arrived)}..{max(arrived)}"
        message = f"telemetry window{'s' if len(arrived) > 1 else ''} {span} arrived late: gap filled"
        session.add(DeviceEventRecord(device_id=gap.device_id, kind=TELEMETRY_GAP_FILLED, message=message))
        session.delete(gap)
        return
    (gap.first_seq, gap.last_seq), rest = left[0], left[1:]
    session.add(gap)
    for first, last in rest:
        session.add(
            TelemetryGap(
                device_id=gap.device_id,
                first_seq=first,
                last_seq=last,
                detected_at=gap.detected_at,
                reported_at=gap.reported_at,
            )
        )


def _dropped(session: Session, window: TelemetryWindow) -> bool:
    chain = session.get(TelemetryChain, window.device_id) or TelemetryChain(device_id=window.device_id)
    if window.dropped_windows <= chain.dropped_windows:
        return False
    more = window.dropped_windows - chain.dropped_windows
    chain.dropped_windows = window.dropped_windows
    session.add(chain)
    message = f"the device dropped {more} telemetry windows (its outbox was full); {chain.dropped_windows} in all"
    session.add(DeviceEventRecord(device_id=window.device_id, kind=TELEMETRY_DROPPED, message=message))
    log.warning("telemetry dropped device=%s: %s", window.device_id, message)
    return True


def reported_missing(session: Session, device_id: str, limit: int = MAX_ACK_MISSING) -> list[SeqRange]:
    """The newest `limit` reported gaps of `device_id`, lowest first (`TelemetryAck.missing`)."""
    statement = (
        select(TelemetryGap.first_seq, TelemetryGap.last_seq)
        .where(TelemetryGap.device_id == device_id, col(TelemetryGap.reported_at).is_not(None))
        .order_by(col(TelemetryGap.last_seq).desc())
        .limit(limit)
    )
    return [SeqRange(first=first, last=last) for first, last in reversed(list(session.exec(statement)))]


def telemetry_health(
    session: Session, device_ids: Sequence[str] | None = None
) -> dict[str, tuple[int, TelemetryGapsPublic]]:
    """device id → (windows it dropped, its reported gaps), for devices with either."""
    gaps = select(TelemetryGap).where(col(TelemetryGap.reported_at).is_not(None))
    chains = select(TelemetryChain).where(col(TelemetryChain.dropped_windows) > 0)
    if device_ids is not None:
        gaps = gaps.where(col(TelemetryGap.device_id).in_(device_ids))
        chains = chains.where(col(TelemetryChain.device_id).in_(device_ids))
    ranges: dict[str, list[tuple[int, int]]] = {}
    for gap in session.exec(gaps.order_by(col(TelemetryGap.first_seq))):
        ranges.setdefault(gap.device_id, []).append((gap.first_seq, gap.last_seq))
    dropped = {chain.device_id: chain.dropped_windows for chain in session.exec(chains)}
    health = {}
    for device_id in set(ranges) | set(dropped):
        own = ranges.get(device_id, [])
        public = TelemetryGapsPublic(
            count=len(own), windows=sum(last - first + 1 for first, last in own), ranges=own[-MAX_GAP_RANGES:]
        )
        health[device_id] = (dropped.get(device_id, 0), public)
    return health
