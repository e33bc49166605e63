"""The per-device telemetry `seq`: handed out once, persisted before it is published, never reused.

`SeqCounter` keeps the next seq and the previous one (the window a new window links back to, its
`TelemetryWindow.prev_seq`) in one file, `"{next}\\n{prev}"` (an older agent's file holds only `next`: its
previous window is then unknown, and the next window starts a new chain).

A counter whose file is missing or unreadable does not guess: `resume` settles it from the coordinator's
`TelemetryAck`s (`resume_seq`), above every seq they say is stored plus `SEQ_MARGIN`; without any, at 0.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from pathlib import Path

from agent._fs import atomic_write_bytes
from protocol import TelemetryAck

__all__ = ["SEQ_FILE", "SEQ_MARGIN", "SeqCounter", "resume_seq", "seq_after_ack", "start_counter"]

log = logging.getLogger(__name__)

# Seqs left out above the coordinator's `max_seq` when the counter was lost: windows an earlier run published
# that the coordinator had not stored when it acknowledged (at most paho's queue, `MqttTransport(max_queued)`).
SEQ_MARGIN = 1000
# The counter's file in the agent's data directory.
SEQ_FILE = "telemetry-seq"


def start_counter(data_dir: Path) -> bool:
    """A device enrolled on a fresh data directory has sent no window from it: its counter starts at 0, known.

    Without this file its first start would wait for the coordinator's acknowledgement and, hearing "nothing
    stored" (which can also mean "not stored yet"), skip `SEQ_MARGIN` seqs. An existing file is left as it is.
    True if the file was written.
    """
    path = data_dir / SEQ_FILE
    if path.exists():
        return False
    atomic_write_bytes(path, b"0")
    return True


def resume_seq(acks: Sequence[TelemetryAck], margin: int = SEQ_MARGIN) -> int:
    """Where a lost counter continues: `margin` above every seq any of `acks` says is stored; 0 without any. Pure.

    The margin applies to "nothing stored" too: an acknowledgement can be older than windows already on their
    way (the coordinator throttles it, and stores what the broker still holds only when it can).
    """
    if not acks:
        return 0
    stored = max((ack.max_seq for ack in acks if ack.max_seq is not None), default=-1)
    return stored + 1 + margin


def seq_after_ack(next_seq: int, ack: TelemetryAck, margin: int = SEQ_MARGIN) -> int | None:
    """The seq a known counter jumps to when `ack` shows its next seq already stored, else None. Pure.

    That counter's file was restored from an older copy: seqs at or below `max_seq` would be dropped as
    duplicates.
    """
    if ack.max_seq is not None and ack.max_seq >= next_seq:
        return resume_seq([ack], margin)
    return None


class SeqCounter:
    """Per-device telemetry sequence numbers, persisted in `path` before each is published.

    Without a readable file the counter is unknown (`reserve()` returns None) until `resume` settles it from the
    coordinator's acknowledgements (or from none: a device that never sent telemetry starts at 0). `used`: the
    highest seq the agent knows it used (its outbox): the counter continues above it whatever the file says.
    """

    def __init__(self, path: Path, *, used: int | None = None) -> None:
        self._path = path
        self._lock = threading.Lock()
        self._next, self._prev = self._load()
        self._used = used
        if used is not None and self._next is not None and used >= self._next:
            log.warning("telemetry seq %s is behind the outbox (seq %d): continuing at %d", path, used, used + 1)
            self._set(used + 1, used)

    def _load(self) -> tuple[int | None, int | None]:
        try:
            text = self._path.read_text()
        except FileNotFoundError:
            log.info("no telemetry seq file %s; holding windows until the coordinator acknowledges", self._path)
            return None, None
        except OSError as exc:
            log.warning("cannot read telemetry seq %s (%s); holding windows until acknowledged", self._path, exc)
            return None, None
        lines = text.split()
        try:
            value = int(lines[0]) if len(lines) in (1, 2) else -1
            prev = int(lines[1]) if len(lines) == 2 else None
        except ValueError:
            value, prev = -1, None
        if value < 0 or (prev is not None and not 0 <= prev < value):
            log.warning("unreadable telemetry seq %s (%r); holding windows until acknowledged", self._path, text[:40])
            return None, None
        return value, prev

    @property
    def known(self) -> bool:
        """True once the counter knows where it stands (its file, or `resume`)."""
        with self._lock:
            return self._next is not None

    def reserve(self) -> tuple[int, int | None] | None:
        """`(seq, prev_seq)` of the next window, not yet used (`commit` does); None while the counter is unknown."""
        with self._lock:
            return None if self._next is None else (self._next, self._prev)

    def commit(self, seq: int) -> None:
        """`seq` was used (its window is in the outbox): the next one follows it, on disk before this returns.

        A counter that jumped since `reserve` (an acknowledgement) stays where it jumped to.
        """
        with self._lock:
            if self._next == seq:
                self._set(seq + 1, seq)

    def next(self) -> int | None:
        """Reserve and commit the next seq at once; None while the counter is unknown."""
        reserved = self.reserve()
        if reserved is None:
            return None
        self.commit(reserved[0])
        return reserved[0]

    def resume(self, acks: Sequence[TelemetryAck]) -> bool:
        """Settle an unknown counter at `resume_seq(acks)` (above `used`); False (nothing changes) if it is known."""
        with self._lock:
            if self._next is not None:
                return False
            target = resume_seq(acks)
            if self._used is not None:
                target = max(target, self._used + 1)
            # The next window links to the newest one this agent still has (None: a new chain, a declared jump).
            self._set(target, self._used)
        if not acks:
            log.info(
                "telemetry seq starts at %d: no acknowledgement from the coordinator (never sent telemetry)", target
            )
        else:
            stored = max((a.max_seq for a in acks if a.max_seq is not None), default=None)
            log.warning(
                "telemetry seq continues at %d (no usable seq file): coordinator stored %s, +%d for windows in flight",
                target,
                "nothing" if stored is None else f"up to {stored}",
                SEQ_MARGIN,
            )
        return True

    def acknowledged(self, ack: TelemetryAck) -> bool:
        """Check a known counter against the coordinator's acknowledgement (`seq_after_ack`); True if it jumped."""
        with self._lock:
            previous = self._next
            target = None if previous is None else seq_after_ack(previous, ack)
            if previous is None or target is None:
                return False
            self._set(target, self._prev)
        log.warning(
            "telemetry seq jumps from %d to %d: the coordinator stored up to %s already (seq file from an older copy?)",
            previous,
            target,
            ack.max_seq,
        )
        return True

    def _set(self, value: int, prev: int | None) -> None:
        text = str(value) if prev is None else f"{value}\n{prev}"
        atomic_write_bytes(self._path, text.encode())
        self._next, self._prev = value, prev
