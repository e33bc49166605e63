"""Telemetry gaps: settling each device's chain of windows, reporting holes that outlive a grace period.

`settle_chain` walks the stored windows above the device's settled seq (`cloud.telemetry.chain`, at most
`scan_rows` per call); `settle_chains` walks many devices' chains with three statements for all of them (each
device's own index lookup and LIMIT, joined by UNION ALL), a device reading on by itself only past its first page.
A hole it meets is pending first (one `TelemetryGap` row without `reported_at`); while the
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
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlmodel import Session, col, select

from cloud.models import DeviceEventRecord, TelemetryChain, TelemetryGap, TelemetryGapsPublic, TelemetryRecord, as_utc
from cloud.telemetry.chain import Hole, Link, split_range, walk_chain
from protocol.messages import MAX_ACK_MISSING, SeqRange, TelemetryWindow

__all__ = [
    "GAP_GRACE_S",
    "MAX_GAP_RANGES",
    "TELEMETRY_DROPPED",
    "TELEMETRY_GAP",
    "TELEMETRY_GAP_FILLED",
    "Settled",
    "highest_seqs",
    "links_above",
    "reported_missing",
    "reported_missing_of",
    "settle_chain",
    "settle_chains",
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

    `commit=False` leaves the changes to the caller's transaction (flushed, not committed)."""
    settled = settle_chains(session, [device_id], now=now, grace_s=grace_s, scan_rows=scan_rows)[device_id]
    if commit:
        session.commit()
    return settled


def settle_chains(
    session: Session, device_ids: Sequence[str], *, now: datetime, grace_s: float, scan_rows: int
) -> dict[str, Settled]:
    """`settle_chain` for many devices in the caller's transaction (flushed, not committed).

    Three statements whatever the number of devices (their chains, their pending holes, the first page of each
    one's windows above its settled seq); a device walks on with queries of its own only when its first page is
    not the end of the walk (more than a page of windows, or a hole reported and passed)."""
    ids = sorted(set(device_ids))
    chains = {
        chain.device_id: chain
        for chain in session.exec(select(TelemetryChain).where(col(TelemetryChain.device_id).in_(ids)))
    }
    pending: dict[str, TelemetryGap] = {}
    unreported = select(TelemetryGap).where(
        col(TelemetryGap.device_id).in_(ids), col(TelemetryGap.reported_at).is_(None)
    )
    for gap in session.exec(unreported.order_by(col(TelemetryGap.id))):
        pending.setdefault(gap.device_id, gap)  # at most one per device
    page = min(_PAGE, scan_rows)
    first_pages = (
        links_above(session, {d: chains[d].settled_seq if d in chains else None for d in ids}, page) if page > 0 else {}
    )
    answers = {
        device_id: _settle(
            session,
            device_id,
            chains.get(device_id),
            pending.get(device_id),
            first_pages.get(device_id, []),
            now=now,
            grace_s=grace_s,
            scan_rows=scan_rows,
        )
        for device_id in ids
    }
    session.flush()
    return answers


def _settle(
    session: Session,
    device_id: str,
    chain: TelemetryChain | None,
    pending: TelemetryGap | None,
    first_page: list[Link],
    *,
    now: datetime,
    grace_s: float,
    scan_rows: int,
) -> Settled:
    """One device's walk, its first page of links read already (`first_page`: at most min(_PAGE, scan_rows))."""
    start = settled = chain.settled_seq if chain is not None else None
    scanned, recheck, walked_all = 0, None, False
    ahead: list[Link] | None = first_page
    while True:
        limit = min(_PAGE, scan_rows - scanned)
        if limit <= 0:
            recheck = 0.0  # more to walk than one call may: again soon
            break
        links, ahead = (ahead, None) if ahead is not None else (_links_above(session, device_id, settled, limit), None)
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
    return Settled(settled, recheck)


# Per-device statements joined by UNION ALL, this many devices a statement (SQLite allows 500 compound terms).
_DEVICES_PER_STATEMENT = 100


def _per_device(session: Session, term: str, params: list[dict[str, Any]]) -> list[Any]:
    """Run `term` (SQL with :d, :s, :n placeholders) once per params dict, joined by UNION ALL; every row.

    Each device keeps its own index lookup and LIMIT (a GROUP BY or window function over the devices would read
    every row of a device with a long history)."""
    rows: list[Any] = []
    for start in range(0, len(params), _DEVICES_PER_STATEMENT):
        chunk = params[start : start + _DEVICES_PER_STATEMENT]
        sql, values = [], {}
        for i, own in enumerate(chunk):
            sql.append(f"SELECT * FROM ({term.replace(':', f':p{i}_')}) AS t{i}")
            values.update({f"p{i}_{k}": v for k, v in own.items()})
        rows.extend(session.connection().execute(text(" UNION ALL ".join(sql)), values))
    return rows


def links_above(session: Session, settled: dict[str, int | None], limit: int) -> dict[str, list[Link]]:
    """device → its first `limit` (seq, prev_seq) above its settled seq (None: from the start), in seq order."""
    term = (
        "SELECT device_id, seq, prev_seq FROM telemetry_window WHERE device_id = :d AND seq > :s ORDER BY seq LIMIT :n"
    )
    # seqs are >= 0, so "nothing settled" reads from above -1
    params = [{"d": d, "s": -1 if s is None else s, "n": limit} for d, s in settled.items()]
    links: dict[str, list[Link]] = {}
    for device_id, seq, prev in _per_device(session, term, params):
        links.setdefault(device_id, []).append((int(seq), None if prev is None else int(prev)))
    for own in links.values():
        own.sort()
    return links


def highest_seqs(session: Session, device_ids: Sequence[str]) -> dict[str, int]:
    """device → the highest seq stored of it (devices with none left out); one index lookup each."""
    term = "SELECT device_id, seq FROM telemetry_window WHERE device_id = :d ORDER BY seq DESC LIMIT 1"
    return {d: int(s) for d, s in _per_device(session, term, [{"d": d} for d in device_ids])}


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
    return reported_missing_of(session, [device_id], limit).get(device_id, [])


def reported_missing_of(
    session: Session, device_ids: Sequence[str], limit: int = MAX_ACK_MISSING
) -> dict[str, list[SeqRange]]:
    """`reported_missing` of each of `device_ids` in one statement (devices without a reported gap left out)."""
    term = (
        "SELECT device_id, first_seq, last_seq FROM telemetry_gap WHERE device_id = :d AND reported_at IS NOT NULL "
        "ORDER BY last_seq DESC LIMIT :n"
    )
    missing: dict[str, list[SeqRange]] = {}
    for device_id, first, last in _per_device(session, term, [{"d": d, "n": limit} for d in device_ids]):
        missing.setdefault(device_id, []).append(SeqRange(first=int(first), last=int(last)))
    for ranges in missing.values():
        ranges.sort(key=lambda r: r.last)
    return missing


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
