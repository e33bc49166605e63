"""The telemetry outbox: a window is on disk before it is published and until the coordinator confirms it; it is
published again after a connect and while unconfirmed; bounded, counting what it drops; restarts keep it all."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.telemetry import ACKS_TO_SETTLE, SEQ_MARGIN, SeqCounter, TelemetryPublisher, TelemetryRecorder
from protocol import ModelRef, TelemetryAck, TelemetryWindow, decode
from protocol.messages import SeqRange

REF = ModelRef(name="digits", version="1.0", sha256="a" * 64)


class Device:
    """A publisher with an outbox in `root`, recording what it publishes; `restart()` builds it again from disk."""

    def __init__(self, root: Path, **outbox: int) -> None:
        self.root = root
        self.outbox_limits = outbox
        self.sent: list[TelemetryWindow] = []
        self.connected = True
        self.restart()

    def restart(self) -> None:
        self.outbox = Outbox(self.root / "telemetry", **self.outbox_limits)
        self.recorder = TelemetryRecorder()
        self.publisher = TelemetryPublisher(
            device_id="dev-1",
            recorder=self.recorder,
            seq=SeqCounter(self.root / "telemetry-seq", used=self.outbox.highest),
            publish=self.sent.append,
            interval_s=3600,
            outbox=self.outbox,
            resend_s=0.2,
            is_connected=lambda: self.connected,
        )

    def close_windows(self, count: int) -> None:
        for _ in range(count):
            self.recorder.record(REF, 1.0, True, None)
            self.publisher.flush()

    def on_disk(self) -> list[int]:
        return sorted(int(p.stem) for p in (self.root / "telemetry" / "outbox").glob("*.json"))

    @property
    def seqs(self) -> list[int]:
        return [w.seq for w in self.sent]


def confirmed(stored_seq: int, max_seq: int | None = None, missing: tuple[tuple[int, int], ...] = ()) -> TelemetryAck:
    return TelemetryAck(
        device_id="dev-1",
        stored_seq=stored_seq,
        max_seq=max_seq if max_seq is not None else stored_seq,
        missing=[SeqRange(first=a, last=b) for a, b in missing],
    )


@pytest.fixture
def device(tmp_path: Path) -> Device:
    (tmp_path / "telemetry-seq").write_text("0")
    return Device(tmp_path)


def test_window_is_on_disk_before_it_is_published_and_linked_to_the_one_before(device: Device) -> None:
    on_disk_when_sent: list[list[int]] = []
    device.publisher._publish = lambda w: on_disk_when_sent.append(device.on_disk())  # type: ignore[method-assign]
    device.close_windows(3)
    assert on_disk_when_sent == [[0], [0, 1], [0, 1, 2]]
    outbox = device.root / "telemetry" / "outbox"
    stored = [decode(TelemetryWindow, (outbox / f"{seq:020d}.json").read_bytes()) for seq in (0, 1, 2)]
    assert [(w.seq, w.prev_seq) for w in stored] == [(0, None), (1, 0), (2, 1)]


def test_confirmed_windows_are_deleted_and_missing_ones_kept(device: Device) -> None:
    device.close_windows(6)
    device.publisher.acknowledged(confirmed(4, max_seq=5, missing=((2, 2),)))
    assert device.on_disk() == [2, 5] and device.publisher.unconfirmed == [2, 5]
    device.publisher.acknowledged(confirmed(5))
    assert device.on_disk() == [] and device.publisher.unconfirmed == []


def test_unconfirmed_windows_are_published_again_after_a_connect_and_while_unconfirmed(device: Device) -> None:
    device.connected = False
    device.close_windows(3)
    assert device.sent == [], "published while disconnected"
    device.connected = True
    device.publisher.start()
    try:
        device.publisher.connected()
        deadline = time.monotonic() + 5
        while device.seqs.count(0) < 2 and time.monotonic() < deadline:  # once after the connect, then again
            time.sleep(0.02)
        assert device.seqs[:3] == [0, 1, 2] and device.seqs.count(0) >= 2
        device.publisher.acknowledged(confirmed(2))
        time.sleep(0.1)
        before = len(device.sent)
        time.sleep(0.5)
        assert len(device.sent) == before, "confirmed windows were sent again"
    finally:
        device.publisher.stop()


def test_restarted_agent_keeps_unconfirmed_windows_and_continues_the_chain(device: Device) -> None:
    device.close_windows(3)
    device.restart()
    assert device.publisher.unconfirmed == [0, 1, 2]
    assert device.publisher.resend() == 3 and device.seqs == [0, 1, 2, 0, 1, 2]
    device.close_windows(1)
    assert (device.sent[-1].seq, device.sent[-1].prev_seq) == (3, 2)


def test_counter_file_behind_the_outbox_continues_above_it(device: Device) -> None:
    device.close_windows(3)
    (device.root / "telemetry-seq").write_text("1")  # an older copy, or a crash between outbox and counter
    device.restart()
    device.close_windows(1)
    assert (device.sent[-1].seq, device.sent[-1].prev_seq) == (3, 2)


def test_outbox_is_bounded_and_counts_what_it_dropped(tmp_path: Path) -> None:
    (tmp_path / "telemetry-seq").write_text("0")
    device = Device(tmp_path, max_windows=5)
    device.close_windows(8)
    assert device.on_disk() == [3, 4, 5, 6, 7], "not the newest kept"
    assert device.publisher.dropped == 3
    assert [w.dropped_windows for w in device.sent] == [0, 0, 0, 0, 0, 1, 2, 3]  # the newest window says it
    device.restart()
    assert device.publisher.dropped == 3, "the count did not survive a restart"
    payload = len((tmp_path / "telemetry" / "outbox" / f"{7:020d}.json").read_bytes())

    by_bytes = Device(tmp_path / "small", max_windows=100, max_bytes=3 * payload + payload // 2)
    (tmp_path / "small" / "telemetry-seq").write_text("0")
    by_bytes.restart()
    by_bytes.close_windows(6)
    assert by_bytes.on_disk() == [3, 4, 5] and by_bytes.publisher.dropped == 3


def test_windows_held_for_an_unknown_counter_survive_a_restart(tmp_path: Path) -> None:
    device = Device(tmp_path)  # no seq file: the counter is unknown, windows are held
    device.close_windows(3)
    assert device.sent == [] and device.publisher.held == 3
    device.restart()
    assert device.publisher.held == 3, "held windows were lost by the restart"
    for _ in range(ACKS_TO_SETTLE):
        device.publisher.acknowledged(TelemetryAck(device_id="dev-1", stored_seq=9, max_seq=9))
    first = 9 + 1 + SEQ_MARGIN
    assert device.seqs == [first, first + 1, first + 2] and device.publisher.held == 0
    assert device.sent[0].prev_seq is None, "a lost counter's first window must start a new chain"
    assert device.on_disk() == device.seqs and list((tmp_path / "telemetry" / "held").glob("*.json")) == []


def test_held_window_half_moved_by_a_crash_is_in_the_outbox_once(tmp_path: Path) -> None:
    device = Device(tmp_path)
    device.close_windows(1)
    held = next((tmp_path / "telemetry" / "held").glob("*.json"))
    wrapped = json.loads(held.read_text())["window"]
    held.write_text(json.dumps(wrapped | {"seq": 1010}))  # rewritten with its seq; the crash came before the rename
    device.restart()
    assert device.publisher.held == 0 and device.on_disk() == [1010]
    assert list((tmp_path / "telemetry" / "held").glob("*.json")) == []
