"""The serving path as callers see it: every call counted once however many threads call, taps removed for good,
metrics read from telemetry's counts."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from agent.metrics import AgentMetrics, AgentReading
from agent.serving import ActiveModel, Serving
from agent.windows import SUMMARY_BATCH, TelemetryRecorder, build_window
from tests.agent.test_server import digits_serving

ROWS = np.random.default_rng(17).random((4, 64), dtype=np.float32)


def recorded_serving(tmp_path: Path, data: bytes, recorder: TelemetryRecorder) -> Serving:
    active = digits_serving(tmp_path, data).current()
    assert active is not None
    serving = Serving(record=recorder.record)
    serving.swap(active)
    return serving


def test_concurrent_callers_lose_no_inference_while_batches_are_summarized(
    tmp_path: Path, digits_model_bytes: bytes
) -> None:
    recorder = TelemetryRecorder(sketch_rate=0.5, seed=3)
    serving = recorded_serving(tmp_path, digits_model_bytes, recorder)
    threads, calls = 4, SUMMARY_BATCH + 300  # each thread alone crosses a summary batch
    predicted: list[int] = []
    lock = threading.Lock()

    def caller(offset: int) -> None:
        mine = [
            int(np.argmax(serving.infer({"input": ROWS[(offset + i) % 4 :][:1]})["probabilities"]))
            for i in range(calls)
        ]
        with lock:
            predicted.extend(mine)

    workers = [threading.Thread(target=caller, args=(n,)) for n in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    closed = recorder.take()
    assert closed is not None
    window = build_window("dev-1", 1, closed)
    assert window.inference_count == threads * calls == sum(window.latency_histogram)
    assert window.class_counts == {str(c): predicted.count(c) for c in set(predicted)}
    assert window.sketches is not None and 0 < window.sketches.rows < threads * calls
    assert recorder.sketch_failures == 0 and recorder.take() is None


def test_a_removed_tap_is_not_called_again(tmp_path: Path, digits_model_bytes: bytes) -> None:
    serving = digits_serving(tmp_path, digits_model_bytes)

    class Watch:
        seen = 0

        def tap(self, *_: object) -> None:
            self.seen += 1

    watch = Watch()
    serving.add_tap(watch.tap)
    serving.infer({"input": ROWS})
    serving.remove_tap(watch.tap)  # another bound method object, equal to the one added
    serving.infer({"input": ROWS})
    assert watch.seen == 1


def test_metrics_read_inference_counts_from_the_recorder(tmp_path: Path, digits_model_bytes: bytes) -> None:
    recorder = TelemetryRecorder()
    serving = recorded_serving(tmp_path, digits_model_bytes, recorder)
    reading = AgentReading(
        version="0", model=None, update_phase=None, telemetry_unconfirmed=0, telemetry_dropped=0,
        supernode_state="disabled", rejected_messages=0,
    )  # fmt: skip
    metrics = AgentMetrics(lambda: reading, recorder.served)
    for _ in range(3):
        serving.infer({"input": ROWS})
    text = metrics.exposition(None)[0].decode()
    assert 'edgefleet_agent_inferences_total{model="digits",version="1.0"} 3.0' in text
    assert 'edgefleet_agent_inference_latency_seconds_count{model="digits",version="1.0"} 3.0' in text
    assert isinstance(serving.current(), ActiveModel)
