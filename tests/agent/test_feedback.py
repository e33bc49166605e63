"""Labels fed back for earlier predictions: remembered by request id, counted once in the window they arrive in.

Real parts: real agents (or `create_app` on real uvicorn) serving the digits model in ONNX Runtime, telemetry
windows read off a real broker (Mosquitto and amqtt), the Prometheus scrape of the agent's endpoint.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent import Agent, AlreadyLabelledError, LabelMismatchError, UnknownRequestError
from agent.feedback import Feedback, Prediction, PredictionLog, parse_feedback, score
from agent.runtime.onnx import OnnxRuntime
from agent.serving import ActiveModel, Serving
from agent.windows import TelemetryRecorder, build_window
from protocol import ModelRef, ModelSpec, OutputSemantics, TelemetryWindow
from protocol.messages import LabelCounts
from tests.agent.conftest import AgentFactory, Observer, install_model, model_spec
from tests.agent.test_server import endpoint, offline_config

ROWS = np.random.default_rng(7).random((12, 64), dtype=np.float32)
TOKEN = "feedback-token-of-the-device"
# Labels that do not fit request "one" (1 row) or "pair" (2 rows) of the digits classifier (10 classes, no names).
WRONG_KIND: list[dict[str, Any]] = [
    {"id": "one", "label": "three"},
    {"id": "one", "label": 10},
    {"id": "pair", "label": 1},
    {"id": "pair", "labels": [1, 2, 3]},
    {"id": "one", "label": 2.5},
    {"id": "one", "label": None},
]


def infer_body(rows: np.ndarray, request_id: str) -> dict[str, Any]:
    return {
        "id": request_id,
        "inputs": [{"name": "input", "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}],
    }


def predict(client: httpx.Client, rows: np.ndarray, request_id: str) -> list[int]:
    """Infer `rows` under `request_id` over HTTP; the predicted class per row."""
    response = client.post("/v2/models/digits/infer", json=infer_body(rows, request_id))
    assert response.status_code == 200, response.text
    assert response.json()["id"] == request_id
    (output,) = response.json()["outputs"]
    return [int(c) for c in np.argmax(np.asarray(output["data"]).reshape(output["shape"]), axis=1)]


def wrong(cls: int) -> int:
    return (cls + 1) % 10


@pytest.fixture
def offline_agent(tmp_path: Path, digits_model_bytes: bytes) -> Iterator[tuple[Agent, httpx.Client]]:
    """A real agent serving digits whose broker is absent (feedback must not depend on MQTT), remembering 4 ids."""
    data_dir = tmp_path / "data"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    agent = Agent(offline_config(data_dir, feedback_max_ids=4))
    agent.start()
    assert agent.inference_url is not None
    with httpx.Client(base_url=agent.inference_url, timeout=10) as client:
        yield agent, client
    agent.stop()


# -- the window carries what was fed back --------------------------------------------------------------------


@pytest.mark.e2e
def test_labels_fed_back_arrive_exactly_in_the_window_they_arrive_in(
    make_agent: AgentFactory, observer: Observer, digits_model_bytes: bytes, tmp_path: Path
) -> None:
    install_model(tmp_path / "agents" / "dev-1", model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    agent = make_agent(http_port=0)
    agent.start()
    assert agent.inference_url is not None
    topic = observer.topics.telemetry("dev-1")
    with httpx.Client(base_url=agent.inference_url, timeout=10) as client:
        predicted = {f"req-{i}": predict(client, ROWS[i : i + 1], f"req-{i}") for i in range(6)}
        predicted["batch"] = predict(client, ROWS[6:9], "batch")
        # req-0..3 right, req-4 and req-5 wrong; the batch: rows 0 and 2 right, row 1 wrong
        body = [{"id": f"req-{i}", "label": predicted[f"req-{i}"][0]} for i in range(4)]
        body += [{"id": f"req-{i}", "label": wrong(predicted[f"req-{i}"][0])} for i in (4, 5)]
        b = predicted["batch"]
        body.append({"id": "batch", "labels": [b[0], wrong(b[1]), b[2]]})
        answer = client.post("/v2/models/digits/feedback", json=body)
        assert answer.status_code == 200, answer.text
        assert (answer.json()["labelled"], answer.json()["correct"], answer.json()["stale"]) == (9, 6, [])

        expected: dict[str, list[int]] = {}
        for item in body:
            rows = predicted[item["id"]]
            for label, guess in zip(item.get("labels", [item.get("label")]), rows, strict=True):
                pair = expected.setdefault(str(label), [0, 0])
                pair[0] += 1
                pair[1] += int(label == guess)
        agent.flush_telemetry()
        first = observer.wait_for(topic, TelemetryWindow, lambda w: True)
        assert first.inference_count == 7
        assert first.labels is not None
        assert (first.labels.labelled, first.labels.correct, first.labels.by_class) == (9, 6, expected)

        # A label counts in the window in which it arrives, whenever its prediction was made; a window of labels
        # only is sent too.
        predicted["late"] = predict(client, ROWS[9:10], "late")
        agent.flush_telemetry()
        second = observer.wait_for(topic, TelemetryWindow, lambda w: w.seq != first.seq)
        assert second.inference_count == 1 and second.labels is None
        assert client.post("/v2/models/digits/feedback", json={"id": "late", "label": predicted["late"][0]}).is_success
        agent.flush_telemetry()
        third = observer.wait_for(topic, TelemetryWindow, lambda w: w.seq not in (first.seq, second.seq))
        assert third.inference_count == 0 and third.model == agent.active_model
        assert third.labels is not None and (third.labels.labelled, third.labels.correct) == (1, 1)


# -- refusals: clear, nothing counted, the model keeps serving ---------------------------------------------


def test_unknown_duplicate_and_wrong_labels_are_refused_and_count_nothing(
    offline_agent: tuple[Agent, httpx.Client],
) -> None:
    agent, client = offline_agent
    (cls,) = predict(client, ROWS[:1], "one")
    pair = predict(client, ROWS[1:3], "pair")
    url = "/v2/models/digits/feedback"

    unknown = client.post(url, json={"id": "never-seen", "label": 3})
    assert unknown.status_code == 404 and "never-seen" in unknown.json()["error"]
    assert "forgotten" in unknown.json()["error"]
    for bad in WRONG_KIND:
        answer = client.post(url, json=bad)
        assert answer.status_code == 422, (bad, answer.text)
    assert client.post(url, content=b"{not json").status_code == 400
    assert client.post(url, json={"id": "one", "label": 1, "labels": [1]}).status_code == 400
    # A body is taken whole or not at all: one unknown id refuses the batch, every refused item is listed.
    batch = client.post(url, json=[{"id": "one", "label": cls}, {"id": "gone", "label": 1}, {"id": "x", "label": 1}])
    assert batch.status_code == 404
    assert [(r["index"], r["reason"]) for r in batch.json()["refused"]] == [(1, "unknown_id"), (2, "unknown_id")]

    assert client.post(url, json={"id": "one", "label": cls}).json()["correct"] == 1  # counted now, once
    again = client.post(url, json={"id": "one", "label": cls})
    assert again.status_code == 409 and "once" in again.json()["error"]
    twice = client.post(url, json=[{"id": "pair", "labels": pair}, {"id": "pair", "labels": pair}])
    assert twice.status_code == 409 and twice.json()["refused"][0]["index"] == 1

    assert predict(client, ROWS[:1], "after") == [cls], "the model keeps serving"
    taken = agent._recorder.take()
    assert taken is not None and taken.labels.labelled == 1 and taken.labels.correct == 1
    scrape = client.get("/metrics").text
    assert 'edgefleet_agent_labels_received_total{model="digits"} 1.0' in scrape
    for reason, count in (("unknown_id", 3), ("wrong_kind", 6), ("duplicate", 2), ("malformed", 2)):
        assert f'edgefleet_agent_labels_refused_total{{model="digits",reason="{reason}"}} {count}.0' in scrape


def test_the_oldest_id_is_forgotten_beyond_the_bound(offline_agent: tuple[Agent, httpx.Client]) -> None:
    _, client = offline_agent
    classes = {f"r{i}": predict(client, ROWS[i : i + 1], f"r{i}")[0] for i in range(5)}  # the agent remembers 4
    url = "/v2/models/digits/feedback"
    assert client.post(url, json={"id": "r0", "label": classes["r0"]}).status_code == 404
    for i in range(1, 5):
        assert client.post(url, json={"id": f"r{i}", "label": classes[f"r{i}"]}).status_code == 200
    versioned = client.post("/v2/models/digits/versions/2.0/feedback", json={"id": "r1", "label": 0})
    assert versioned.status_code == 404 and "1.0" in versioned.json()["error"]


def test_predictions_are_forgotten_after_their_age(tmp_path: Path, digits_model_bytes: bytes) -> None:
    now = [0.0]
    log = PredictionLog(max_ids=100, max_age_s=60.0, clock=lambda: now[0])
    serving, recorder, active = _digits_serving_parts(tmp_path, digits_model_bytes)
    feedback = Feedback(log, current=serving.current, add_labels=recorder.add_labels)
    outputs = serving.infer({"input": ROWS[:1]})
    feedback.remember("old", active, outputs)
    now[0] = 30.0
    feedback.remember("young", active, outputs)
    now[0] = 61.0
    cls = int(np.argmax(outputs["probabilities"]))
    with pytest.raises(UnknownRequestError):
        feedback.label("digits", parse_feedback({"id": "old", "label": cls}))
    assert feedback.label("digits", parse_feedback({"id": "young", "label": cls})).correct == 1
    assert log.forgotten == 1


# -- the Python API, versions, class names, auth ----------------------------------------------------------


def test_embedded_use_labels_through_agent_feedback(offline_agent: tuple[Agent, httpx.Client]) -> None:
    agent, _ = offline_agent
    out = agent.infer({"input": ROWS[:2]}, request_id="local-1")
    classes = [int(c) for c in np.argmax(out["probabilities"], axis=1)]
    result = agent.feedback("local-1", [classes[0], wrong(classes[1])])
    assert (result.labelled, result.correct) == (2, 1)
    with pytest.raises(AlreadyLabelledError):
        agent.feedback("local-1", classes)
    with pytest.raises(UnknownRequestError):
        agent.feedback("local-2", 1)
    agent.infer({"input": ROWS[:1]}, request_id="local-3")
    with pytest.raises(LabelMismatchError):
        agent.feedback("local-3", [1, 2])


def test_labels_of_a_retired_version_are_taken_but_dropped(tmp_path: Path, digits_model_bytes: bytes) -> None:
    serving, recorder, active = _digits_serving_parts(tmp_path, digits_model_bytes)
    feedback = Feedback(PredictionLog(), current=serving.current, add_labels=recorder.add_labels)
    with endpoint(serving, feedback=feedback) as url, httpx.Client(base_url=url, timeout=10) as client:
        (cls,) = predict(client, ROWS[:1], "before-update")
        recorder.take()
        serving.swap(ActiveModel(spec=model_spec("digits", "2.0", digits_model_bytes), model=active.model))
        answer = client.post("/v2/models/digits/feedback", json={"id": "before-update", "label": cls})
        assert answer.status_code == 200 and answer.json()["stale"] == ["before-update"]
        assert answer.json()["labelled"] == 0 and recorder.take() is None, "a stale label is not counted"
        assert client.post("/v2/models/digits/feedback", json={"id": "before-update", "label": cls}).status_code == 409


def test_class_names_are_labels_when_the_model_declares_them(tmp_path: Path, digits_model_bytes: bytes) -> None:
    names = [f"digit-{i}" for i in range(10)]
    semantics = OutputSemantics(kind="classifier", scores_output="probabilities", classes=names)
    spec = model_spec("digits", "1.0", digits_model_bytes).model_copy(update={"output_semantics": semantics})
    serving, recorder, _ = _digits_serving_parts(tmp_path, digits_model_bytes, spec=spec)
    feedback = Feedback(PredictionLog(), current=serving.current, add_labels=recorder.add_labels)
    with endpoint(serving, feedback=feedback, token=TOKEN) as url, httpx.Client(base_url=url, timeout=10) as client:
        auth = {"authorization": f"Bearer {TOKEN}"}
        body = infer_body(ROWS[:2], "named")
        out = client.post("/v2/models/digits/infer", json=body, headers=auth).json()["outputs"][0]
        classes = np.argmax(np.asarray(out["data"]).reshape(out["shape"]), axis=1).tolist()
        labels = [names[classes[0]], names[wrong(classes[1])]]
        feedback_url = "/v2/models/digits/feedback"
        assert client.post(feedback_url, json={"id": "named", "labels": labels}).status_code == 401
        assert client.post(feedback_url, json={"id": "named", "labels": ["cat", 1]}, headers=auth).status_code == 422
        answer = client.post(feedback_url, json={"id": "named", "labels": labels}, headers=auth)
        assert answer.status_code == 200 and answer.json()["correct"] == 1
    window = recorder.take()
    assert window is not None and window.labels.by_class == {str(classes[0]): [1, 1], str(wrong(classes[1])): [1, 0]}


def test_feedback_of_a_sampled_model_also_labels_the_sample_store(tmp_path: Path, digits_model_bytes: bytes) -> None:
    data_dir = tmp_path / "data"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    with Agent(offline_config(data_dir, sample_rates={"digits": 1.0})) as agent:
        assert agent.inference_url is not None
        with httpx.Client(base_url=agent.inference_url, timeout=10) as client:
            classes = predict(client, ROWS[:3], "sampled")
            assert client.post("/v2/models/digits/feedback", json={"id": "sampled", "labels": classes}).is_success
        stats = agent.sample_stats
        assert stats is not None and stats.labelled == {"digits": 3}


def _digits_serving_parts(
    directory: Path, data: bytes, *, spec: ModelSpec | None = None
) -> tuple[Serving, TelemetryRecorder, ActiveModel]:
    """A `Serving` recording into a `TelemetryRecorder`, with the digits model in ONNX Runtime."""
    path = directory / "digits.onnx"
    path.write_bytes(data)
    recorder = TelemetryRecorder()
    serving = Serving(record=recorder.record)
    active = ActiveModel(spec=spec or model_spec("digits", "1.0", data), model=OnnxRuntime().load(path))
    serving.swap(active)
    return serving, recorder, active


def test_a_regressor_label_adds_its_absolute_error_and_a_class_name_is_refused() -> None:
    ref = ModelRef(name="meter", version="1.0", sha256="b" * 64)
    prediction = Prediction(model=ref, at=0.0, values=(1.0, 2.0))
    tally = score(prediction, [1.5, 2])
    assert (tally.labelled, tally.correct, tally.by_class, tally.abs_error_sum) == (2, 0, {}, 0.5)
    with pytest.raises(LabelMismatchError, match="a label is a number"):
        score(prediction, ["high", 2.0])
    recorder = TelemetryRecorder()
    recorder.add_labels(ref, tally)
    window = recorder.take()
    assert window is not None and window.inferences == 0
    assert build_window("edge-1", 0, window).labels == LabelCounts(labelled=2, abs_error_sum=0.5)
