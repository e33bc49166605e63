"""The chain of a device's telemetry windows: how far it is settled and the hole that stops it. Pure.

Each stored window links back to its `prev_seq` (`protocol.TelemetryWindow`). Walking the stored windows
above the settled seq in order, a window settles when it has no predecessor (a new chain: the seqs it skipped
are a declared jump, not a loss) or when its predecessor is settled already; a window whose predecessor is
above the settled seq finds that predecessor missing (every seq between them is unstored): the hole runs from
just above the settled seq to the predecessor. A hole stops the walk until its windows arrive or the caller
reports it lost after a grace period (`cloud.telemetry.gaps`) and passes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

__all__ = ["Hole", "Link", "Walk", "split_range", "walk_chain"]

Link = tuple[int, int | None]  # (seq, prev_seq) of a stored window


@dataclass(frozen=True)
class Hole:
    """Seqs `first..last` missing before the stored window `before` (whose predecessor is `last`)."""

    first: int
    last: int
    before: int

    @property
    def windows(self) -> int:
        """How many seqs the hole spans."""
        return self.last - self.first + 1


@dataclass(frozen=True)
class Walk:
    """Where the chain is settled after a walk, how many windows it settled, and the hole that stopped it."""

    settled: int | None
    walked: int
    hole: Hole | None


def walk_chain(settled: int | None, links: Iterable[Link]) -> Walk:
    """Settle `links` (stored windows above `settled`, in seq order) until the first hole."""
    walked = 0
    for seq, prev in links:
        if prev is None or (settled is not None and prev <= settled):
            settled, walked = seq, walked + 1
            continue
        first = 0 if settled is None else settled + 1
        return Walk(settled, walked, Hole(first=first, last=prev, before=seq))
    return Walk(settled, walked, None)


def split_range(first: int, last: int, seqs: Sequence[int]) -> list[tuple[int, int]]:
    """What is left of `first..last` once `seqs` arrived: the sub-ranges still missing, in order."""
    left: list[tuple[int, int]] = []
    start = first
    for seq in sorted(s for s in set(seqs) if first <= s <= last):
        if seq > start:
            left.append((start, seq - 1))
        start = seq + 1
    if start <= last:
        left.append((start, last))
    return left
