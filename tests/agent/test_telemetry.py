"""Telemetry windows: counts equal inferences; `seq` strictly increasing, never reused, even when its file is lost."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from agent import Agent, InferenceInputError
from agent.seq import SEQ_FILE, start_counter
from agent.telemetry import (
    ACKS_TO_SETTLE,
    MAX_HELD_WINDOWS,
    SEQ_MARGIN,
    SeqCounter,
    TelemetryPublisher,
    TelemetryRecorder,
    build_window,
    predicted_classes,
    resume_seq,
    seq_after_ack,
)
from protocol import ModelRef, TelemetryAck, TelemetryWindow
from tests.agent.conftest import AgentFactory, Observer, install_model, model_spec
from tests.cloud.fleet_helpers import enrol, live_coordinator, wait_until

ROWS = np.random.default_rng(3).random((4, 64), dtype=np.float32)
REF = ModelRef(name="digits", version="1.0", sha256="a" * 64)


@pytest.mark.e2e
def test_telemetry_counts_inferences_and_seq_survives_restart(
    make_agent: AgentFactory, observer: Observer, digits_model_bytes: bytes, tmp_path: Path
) -> None:
    spec = model_spec("digits", "1.0", digits_model_bytes)
    data_dir = tmp_path / "agents" / "dev-1"
    install_model(data_dir, spec, digits_model_bytes)
    agent = make_agent()
    agent.start()
    observer.event("dev-1", lambda e: e.kind.value == "agent.started")
    agent.flush_telemetry()  # nothing happened yet: nothing is sent

    predicted = []
    for _ in range(5):
        predicted += list(np.argmax(agent.infer({"input": ROWS})["probabilities"], axis=1))
    for _ in range(2):
        with pytest.raises(InferenceInputError):
            agent.infer({"input": ROWS.astype(np.float64)})
    agent.flush_telemetry()
    first = observer.wait_for(observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: True)
    assert first.inference_count == 7 and first.error_count == 2
    assert first.model == spec.ref
    assert sum(first.latency_histogram) == 7 and first.latency is not None and first.latency.p50_ms > 0
    assert first.class_counts == {str(c): predicted.count(c) for c in set(predicted)}

    agent.infer({"input": ROWS[:1]})
    agent.stop()  # stopping flushes the open window
    second = observer.wait_for(observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: w.seq != first.seq)
    assert second.seq > first.seq and second.inference_count == 1
    assert agent.telemetry_sent_seqs == [first.seq, second.seq]

    again = make_agent()
    again.start()
    again.infer({"input": ROWS[:2]})
    again.flush_telemetry()
    third = observer.wait_for(
        observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: w.seq not in (first.seq, second.seq)
    )
    assert third.seq > second.seq and third.inference_count == 1
    # No coordinator confirms them: the restarted agent sends its outbox again. A resend is the same window.
    by_seq: dict[int, TelemetryWindow] = {}
    for window in observer.telemetry("dev-1"):
        assert by_seq.setdefault(window.seq, window) == window, f"seq {window.seq} reused for another window"
    assert sorted(by_seq) == [first.seq, second.seq, third.seq]
    assert (second.prev_seq, third.prev_seq) == (first.seq, second.seq), "the chain of windows is broken"


@pytest.mark.e2e
def test_windows_are_published_every_interval(
    make_agent: AgentFactory, observer: Observer, digits_model_bytes: bytes, tmp_path: Path
) -> None:
    install_model(tmp_path / "agents" / "dev-1", model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    agent = make_agent(telemetry_interval_s=0.3)
    agent.start()
    agent.infer({"input": ROWS})
    window = observer.wait_for(observer.topics.telemetry("dev-1"), TelemetryWindow, lambda w: True, timeout=10)
    assert window.inference_count == 1


def test_empty_window_is_not_closed() -> None:
    recorder = TelemetryRecorder()
    assert recorder.take() is None
    recorder.record(REF, 1.5, True, {"input": ROWS[:1]}, {"probabilities": np.array([[0.1, 0.9]], dtype=np.float32)})
    closed = recorder.take()
    assert closed is not None and closed.inferences == 1 and recorder.take() is None


def test_window_percentiles_and_histogram() -> None:
    recorder = TelemetryRecorder()
    for ms in [1.0] * 90 + [100.0] * 10:
        recorder.record(REF, ms, True, None)
    closed = recorder.take()
    assert closed is not None
    window = build_window("dev-1", 7, closed)
    assert window.seq == 7 and window.inference_count == 100 and window.error_count == 0
    assert window.latency is not None and window.latency.p50_ms == 1.0 and window.latency.max_ms == 100.0
    assert sum(window.latency_histogram) == 100 and window.window_end >= window.window_start


@pytest.mark.parametrize(
    ("output", "classes"),
    [
        (np.array([[0.1, 0.7, 0.2], [0.9, 0.05, 0.05]], dtype=np.float32), [1, 0]),
        (np.array([0.1, 0.9], dtype=np.float32), []),  # not [batch, classes]
        (np.zeros((2, 3, 4), dtype=np.float32), []),
        (None, []),
    ],
)
def test_predicted_classes_only_for_batch_by_class_outputs(output: np.ndarray | None, classes: list[int]) -> None:
    assert predicted_classes(output) == classes


def test_seq_is_persisted_before_use_and_never_reused(tmp_path: Path) -> None:
    path = tmp_path / "telemetry-seq"
    counter = SeqCounter(path)
    assert counter.resume([])  # no file and no acknowledgement: a new device starts at 0
    assert [counter.next(), counter.next()] == [0, 1]
    assert SeqCounter(path).next() == 2


# -- a lost seq counter: the coordinator's acknowledgements decide -------------------------------------------


def ack(max_seq: int | None) -> TelemetryAck:
    return TelemetryAck(device_id="dev-1", stored_seq=max_seq, max_seq=max_seq)


@pytest.mark.parametrize(
    ("acked", "continues_at"),
    [
        ([], 0),  # no acknowledgement at all: a device that never sent telemetry
        ([None], SEQ_MARGIN),  # nothing stored yet, but windows may be on their way all the same
        ([41], 41 + 1 + SEQ_MARGIN),  # above every stored seq and the windows in flight
        ([None, 41], 41 + 1 + SEQ_MARGIN),  # a stale retained ack, then the coordinator's live answer
        ([41, 7], 41 + 1 + SEQ_MARGIN),
    ],
)
def test_lost_counter_resumes_above_everything_acknowledged(acked: list[int | None], continues_at: int) -> None:
    assert resume_seq([ack(m) for m in acked]) == continues_at


@pytest.mark.parametrize(
    ("next_seq", "acked", "jumps_to"),
    [
        (42, 41, None),  # the usual case: the counter is ahead of what is stored, it stays
        (100, 41, None),
        (0, None, None),
        (5, 41, 41 + 1 + SEQ_MARGIN),  # a seq file restored from an old copy: behind what is stored
        (41, 41, 41 + 1 + SEQ_MARGIN),
    ],
)
def test_known_counter_behind_what_is_stored_jumps_above_it(
    next_seq: int, acked: int | None, jumps_to: int | None
) -> None:
    assert seq_after_ack(next_seq, ack(acked)) == jumps_to


@pytest.mark.parametrize("content", [None, "garbage", "-3", ""])
def test_lost_or_unreadable_seq_file_hands_out_nothing_until_resumed(tmp_path: Path, content: str | None) -> None:
    path = tmp_path / "telemetry-seq"
    if content is not None:
        path.write_text(content)
    counter = SeqCounter(path)
    assert not counter.known and counter.next() is None and not counter.acknowledged(ack(41))
    assert counter.resume([ack(41)])
    assert counter.next() == 41 + 1 + SEQ_MARGIN
    assert SeqCounter(path).next() == 41 + 2 + SEQ_MARGIN, "the decision was not persisted"
    assert not counter.resume([]) and not counter.acknowledged(ack(41))


def test_enrolment_on_a_fresh_data_dir_starts_the_counter_at_zero_and_never_resets_one(tmp_path: Path) -> None:
    assert start_counter(tmp_path)
    assert SeqCounter(tmp_path / SEQ_FILE).next() == 0, "a new device waits for no acknowledgement"
    assert not start_counter(tmp_path), "re-enrolling the same data dir must not reuse seqs"
    assert SeqCounter(tmp_path / SEQ_FILE).next() == 1


def recording_publisher(path: Path, **kwargs: float) -> tuple[TelemetryPublisher, TelemetryRecorder, list[int]]:
    recorder, sent = TelemetryRecorder(), []
    publisher = TelemetryPublisher(
        device_id="dev-1",
        recorder=recorder,
        seq=SeqCounter(path),
        publish=lambda w: sent.append(w.seq),
        interval_s=3600,
        **kwargs,
    )
    return publisher, recorder, sent


def close_windows(publisher: TelemetryPublisher, recorder: TelemetryRecorder, count: int) -> None:
    for _ in range(count):
        recorder.record(REF, 1.0, True, None)
        publisher.flush()


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.02)
    return check()


def test_windows_are_held_until_the_live_acknowledgement_then_published_in_order(tmp_path: Path) -> None:
    publisher, recorder, sent = recording_publisher(tmp_path / "telemetry-seq")
    publisher.connected()
    close_windows(publisher, recorder, 3)
    assert sent == [] and publisher.held == 3
    publisher.acknowledged(ack(None))  # retained, older than what the coordinator has stored by now
    assert sent == [], "settled on the retained acknowledgement alone"
    publisher.acknowledged(ack(9))  # the coordinator's answer to the agent's report
    assert sent == [1010, 1011, 1012] and publisher.held == 0
    publisher.stop()


def test_single_acknowledgement_settles_when_the_wait_is_over(tmp_path: Path) -> None:
    publisher, recorder, sent = recording_publisher(tmp_path / "telemetry-seq", seq_wait_s=0.2)
    close_windows(publisher, recorder, 1)
    publisher.acknowledged(ack(9))  # retained; the coordinator is down and does not answer
    time.sleep(0.4)
    assert sent == [], "the wait starts when the transport connects, not before"
    publisher.connected()
    assert eventually(lambda: sent == [1010])


def test_no_acknowledgement_after_connecting_starts_a_new_device_at_zero(tmp_path: Path) -> None:
    publisher, recorder, sent = recording_publisher(tmp_path / "telemetry-seq", seq_wait_s=0.2)
    close_windows(publisher, recorder, 1)
    publisher.connected()
    assert eventually(lambda: sent == [0])
    publisher.acknowledged(ack(0))  # the coordinator stored it: nothing changes
    close_windows(publisher, recorder, 1)
    assert sent == [0, 1]


def test_held_windows_are_bounded_oldest_dropped(tmp_path: Path) -> None:
    publisher, recorder, sent = recording_publisher(tmp_path / "telemetry-seq")
    close_windows(publisher, recorder, MAX_HELD_WINDOWS + 5)
    assert publisher.held == MAX_HELD_WINDOWS
    for _ in range(ACKS_TO_SETTLE):
        publisher.acknowledged(ack(None))
    assert sent == list(range(SEQ_MARGIN, SEQ_MARGIN + MAX_HELD_WINDOWS))


@pytest.mark.e2e
def test_agent_that_lost_its_seq_file_continues_above_every_seq_it_used(
    make_agent: AgentFactory, broker_url: str, topic_base: str, digits_model_bytes: bytes, tmp_path: Path
) -> None:
    data_dir = tmp_path / "agents" / "dev-1"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    with live_coordinator(tmp_path, mqtt_url=broker_url, topic_base=topic_base) as api:
        enrol(api.coordinator, "dev-1")

        def stored() -> list[int]:
            response = api.client.get("/api/v1/devices/dev-1/telemetry", headers=api.auth)
            return [window["seq"] for window in response.json()["data"]]

        def send_windows(agent: Agent, count: int) -> None:
            for _ in range(count):
                agent.infer({"input": ROWS[:1]})
                agent.flush_telemetry()

        first = make_agent()
        first.start()
        send_windows(first, 3)
        wait_until(lambda: len(stored()) == 3, what="the first run's windows stored")
        wait_until(lambda: not first.telemetry_unconfirmed, what="the first run's windows confirmed")
        first.stop()
        (data_dir / "telemetry-seq").unlink()  # lost: a wiped data partition, a failed write, an operator

        again = make_agent()
        again.start()
        send_windows(again, 3)
        wait_until(lambda: len(stored()) == 6, what="the second run's windows stored")
        seqs = stored()
        assert seqs[3:] == again.telemetry_sent_seqs and min(seqs[3:]) > max(seqs[:3]), seqs
        counters = api.client.get("/api/v1/stats", headers=api.auth).json()
        assert counters["duplicates_dropped"] == 0, "a window was dropped as a duplicate"
