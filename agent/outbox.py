"""The telemetry outbox: every closed window is on disk before it is published, until an acknowledgement confirms it.

Layout under `root` (`data_dir/telemetry`)::

    outbox/{seq:020d}.json   a window as published (its wire bytes), deleted once `TelemetryAck.confirms(seq)`
    held/{n:020d}.json       a closed window waiting for the seq counter to be known (written with seq 0)
    dropped                  how many windows were dropped for good (outbox or hold bound)

A held window becomes an outbox window without ever existing twice: its file is first rewritten (atomically)
with the final seq, then renamed into `outbox/`; a restart finishes a move it finds half done. Bounded: at most
`max_windows` windows and `max_bytes` bytes wait in `outbox/`; beyond that the oldest are deleted and counted in
`dropped`, which every window the agent builds afterwards carries to the coordinator.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

from agent._fs import atomic_write_bytes, fsync_dir
from protocol import MalformedMessageError, TelemetryAck, TelemetryWindow, decode, encode

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_WINDOWS", "Outbox"]

log = logging.getLogger(__name__)

DEFAULT_MAX_WINDOWS = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
_HELD_MARK = "held"  # key of a held file's wrapper: `{"held": true, "window": {...seq 0...}}`


@dataclass
class _Entry:
    size: int
    sent_at: float | None = None  # monotonic time of the last publish; None: not published by this process


def _name(number: int) -> str:
    return f"{number:020d}.json"


def _number(path: Path) -> int | None:
    try:
        return int(path.name.removesuffix(".json")) if path.suffix == ".json" else None
    except ValueError:
        return None


class Outbox:
    """Windows kept on disk until confirmed, and windows held until their seq is known. Thread-safe."""

    def __init__(
        self, root: Path, *, max_windows: int = DEFAULT_MAX_WINDOWS, max_bytes: int = DEFAULT_MAX_BYTES
    ) -> None:
        self._dir = root / "outbox"
        self._held_dir = root / "held"
        self._dropped_path = root / "dropped"
        self._max_windows = max(1, max_windows)
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._dir.mkdir(parents=True, exist_ok=True)
        self._held_dir.mkdir(parents=True, exist_ok=True)
        self._dropped = self._load_dropped()
        self._held: list[int] = []
        self._entries: dict[int, _Entry] = {}
        self._recover_held()
        self._load_outbox()

    # -- loading -------------------------------------------------------------------------------------------

    def _load_dropped(self) -> int:
        try:
            return max(0, int(self._dropped_path.read_text().strip()))
        except (OSError, ValueError):
            return 0

    def _recover_held(self) -> None:
        """Finish moves a restart interrupted; remember the held windows still waiting for a seq."""
        for path in sorted(self._held_dir.glob("*.json")):
            number = _number(path)
            window = self._read(path)
            if number is None or window is None:
                continue
            if isinstance(window, TelemetryWindow):  # rewritten with its seq, not yet renamed
                self._move(path, window.seq)
            else:
                self._held.append(number)

    def _load_outbox(self) -> None:
        for path in self._dir.glob("*.json"):
            seq = _number(path)
            if seq is None:
                continue
            try:
                self._entries[seq] = _Entry(size=path.stat().st_size)
            except FileNotFoundError:
                continue
        if self._entries or self._held:
            log.info("telemetry outbox: %d unconfirmed windows, %d held", len(self._entries), len(self._held))

    def _read(self, path: Path) -> TelemetryWindow | dict[str, object] | None:
        """A file's window (final) or held wrapper; None (and the file set aside) when it is unreadable."""
        try:
            raw = path.read_bytes()
            data = json.loads(raw)
            if isinstance(data, dict) and data.get(_HELD_MARK) is True:
                decode(TelemetryWindow, json.dumps(data["window"]))
                return data
            return decode(TelemetryWindow, raw)
        except (OSError, ValueError, KeyError, MalformedMessageError) as exc:
            log.warning("unreadable telemetry file %s set aside (%s)", path, exc)
            with contextlib.suppress(OSError):
                path.rename(path.with_suffix(".corrupt"))
            return None

    # -- counts --------------------------------------------------------------------------------------------

    @property
    def dropped(self) -> int:
        """Windows dropped for good since the data directory was created."""
        with self._lock:
            return self._dropped

    @property
    def highest(self) -> int | None:
        """The highest seq waiting in the outbox (the newest window this agent knows it produced)."""
        with self._lock:
            return max(self._entries, default=None)

    @property
    def seqs(self) -> list[int]:
        """The seqs waiting for confirmation, in order."""
        with self._lock:
            return sorted(self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def count_dropped(self, count: int) -> None:
        """Count `count` windows dropped elsewhere (held beyond the hold bound), persisted."""
        if count <= 0:
            return
        with self._lock:
            self._dropped += count
            atomic_write_bytes(self._dropped_path, str(self._dropped).encode())

    # -- held windows (seq unknown) -----------------------------------------------------------------------

    def hold(self, window: TelemetryWindow) -> int:
        """Keep a window whose seq is not known yet (`window.seq` is a placeholder); returns its hold number."""
        with self._lock:
            number = max(self._held, default=-1) + 1
            self._held.append(number)
        wrapper = {_HELD_MARK: True, "window": json.loads(encode(window))}
        atomic_write_bytes(self._held_dir / _name(number), json.dumps(wrapper).encode())
        return number

    def held(self) -> list[tuple[int, TelemetryWindow]]:
        """The held windows (hold number, window with a placeholder seq), oldest first."""
        with self._lock:
            numbers = list(self._held)
        found = []
        for number in numbers:
            data = self._read(self._held_dir / _name(number))
            if isinstance(data, dict):
                found.append((number, decode(TelemetryWindow, json.dumps(data["window"]))))
            else:
                with self._lock:
                    self._held.remove(number)
        return found

    def drop_held(self, number: int) -> None:
        """Delete a held window for good (the hold bound), counted in `dropped`."""
        with self._lock:
            if number in self._held:
                self._held.remove(number)
        with contextlib.suppress(FileNotFoundError):
            (self._held_dir / _name(number)).unlink()
        self.count_dropped(1)

    # -- the outbox --------------------------------------------------------------------------------------

    def make_room(self) -> int:
        """Drop the oldest windows until one more fits `max_windows`; returns how many were dropped."""
        with self._lock:
            excess = len(self._entries) + 1 - self._max_windows
            victims = sorted(self._entries)[: max(0, excess)]
        return self._drop(victims, "full")

    def add(self, window: TelemetryWindow, held: int | None = None) -> bytes:
        """Write `window` to the outbox (moving held window `held`), then keep `max_bytes`; returns its payload."""
        payload = encode(window)
        if held is None:
            atomic_write_bytes(self._dir / _name(window.seq), payload)
        else:
            source = self._held_dir / _name(held)
            atomic_write_bytes(source, payload)
            self._move(source, window.seq)
        with self._lock:
            if held is not None and held in self._held:
                self._held.remove(held)
            self._entries[window.seq] = _Entry(size=len(payload))
            total, victims = sum(e.size for e in self._entries.values()), []
            for seq in sorted(self._entries):
                if total <= self._max_bytes or seq == window.seq:
                    break
                victims.append(seq)
                total -= self._entries[seq].size
        self._drop(victims, "over its byte limit")
        return payload

    def _move(self, source: Path, seq: int) -> None:
        """Rename a held file rewritten with its seq into the outbox (atomic: it exists in one place only)."""
        os.replace(source, self._dir / _name(seq))
        for directory in (self._dir, self._held_dir):
            fsync_dir(directory)
        with self._lock:
            self._entries.setdefault(seq, _Entry(size=(self._dir / _name(seq)).stat().st_size))

    def _drop(self, seqs: list[int], why: str) -> int:
        if not seqs:
            return 0
        self._forget(seqs)
        self.count_dropped(len(seqs))
        log.warning(
            "telemetry outbox %s: dropped %d unconfirmed windows (seqs %d..%d), %d dropped in all",
            why,
            len(seqs),
            seqs[0],
            seqs[-1],
            self.dropped,
        )
        return len(seqs)

    def _forget(self, seqs: list[int]) -> None:
        # Files first, then the entries: once a seq is no longer unconfirmed its file is gone (a send racing this
        # finds no file: `payload` answers None). The other order let a caller see nothing unconfirmed while the
        # files were still on disk.
        for seq in seqs:
            with contextlib.suppress(FileNotFoundError):
                (self._dir / _name(seq)).unlink()
        with self._lock:
            for seq in seqs:
                self._entries.pop(seq, None)

    def confirm(self, ack: TelemetryAck) -> int:
        """Delete the windows `ack` confirms stored; returns how many."""
        if ack.stored_seq is None:
            return 0
        with self._lock:
            done = [seq for seq in self._entries if ack.confirms(seq)]
        self._forget(done)
        return len(done)

    def claim(self, seq: int, before: float, at: float) -> bool | None:
        """Mark window `seq` sent at monotonic `at`, unless it was sent at or after `before`.

        None: not to send (confirmed meanwhile, or sent since `before`); else True for its first send by this
        process. One check-and-mark, so two threads never both send it as new.
        """
        with self._lock:
            entry = self._entries.get(seq)
            if entry is None or (entry.sent_at is not None and entry.sent_at >= before):
                return None
            first, entry.sent_at = entry.sent_at is None, at
            return first

    def due(self, before: float | None) -> list[int]:
        """Unconfirmed seqs, in order, not sent since `before` (None: all of them)."""
        with self._lock:
            return sorted(
                seq
                for seq, entry in self._entries.items()
                if before is None or entry.sent_at is None or entry.sent_at < before
            )

    def payload(self, seq: int) -> bytes | None:
        """The wire bytes of window `seq`; None once it is confirmed (or dropped)."""
        try:
            return (self._dir / _name(seq)).read_bytes()
        except FileNotFoundError:
            with self._lock:
                self._entries.pop(seq, None)
            return None
