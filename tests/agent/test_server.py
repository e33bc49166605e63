"""The local Open Inference Protocol endpoint over real HTTP, against ONNX Runtime directly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnxruntime
import pytest

from agent import Agent, AgentConfig
from agent.runtime import OnnxRuntime
from agent.server import InferenceServer, create_app
from agent.serving import ActiveModel, Serving
from tests.agent.conftest import install_model, model_spec
from tests.services import free_port

ROWS = np.random.default_rng(7).random((3, 64), dtype=np.float32)


def offline_config(data_dir: Path, **overrides: object) -> AgentConfig:
    """An agent whose broker is not there: the endpoint must not depend on MQTT."""
    settings: dict[str, object] = {
        "device_id": "edge-1",
        "data_dir": data_dir,
        "mqtt_url": f"mqtt://127.0.0.1:{free_port()}",
        "http_port": 0,
    }
    settings.update(overrides)
    return AgentConfig(**settings)


def digits_serving(directory: Path, data: bytes) -> Serving:
    """A `Serving` with the digits model loaded in the real ONNX runtime, without an agent around it."""
    path = directory / "digits.onnx"
    path.write_bytes(data)
    serving = Serving()
    serving.swap(ActiveModel(spec=model_spec("digits", "1.0", data), model=OnnxRuntime().load(path)))
    return serving


@contextmanager
def endpoint(serving: Serving, *, host: str = "127.0.0.1", **app_options: Any) -> Iterator[str]:
    """`create_app(serving, **app_options)` on real uvicorn at an ephemeral port; yields the base URL."""
    server = InferenceServer(create_app(serving, **app_options), host=host, port=0, name="test")
    url = server.start()
    try:
        yield url
    finally:
        server.stop()


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, digits_model_bytes: bytes) -> Iterator[tuple[Agent, httpx.Client]]:
    """One agent serving the digits model for the whole module (its broker is absent on purpose)."""
    data_dir = tmp_path_factory.mktemp("served") / "data"
    install_model(data_dir, model_spec("digits", "1.0", digits_model_bytes), digits_model_bytes)
    agent = Agent(offline_config(data_dir))
    agent.start()
    assert agent.inference_url is not None
    with httpx.Client(base_url=agent.inference_url, timeout=10) as client:
        yield agent, client
    agent.stop()


def body(rows: np.ndarray, **tensor: object) -> dict[str, object]:
    data: dict[str, object] = {
        "name": "input",
        "shape": list(rows.shape),
        "datatype": "FP32",
        "data": rows.ravel().tolist(),
    }
    data.update(tensor)
    return {"id": "req-1", "inputs": [data]}


def test_infer_returns_exactly_what_onnxruntime_returns(
    served: tuple[Agent, httpx.Client], digits_model_path: Path
) -> None:
    _, client = served
    response = client.post("/v2/models/digits/infer", json=body(ROWS))
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model_name"] == "digits" and answer["model_version"] == "1.0" and answer["id"] == "req-1"
    [output] = answer["outputs"]
    assert output["name"] == "probabilities" and output["datatype"] == "FP32" and output["shape"] == [3, 10]
    session = onnxruntime.InferenceSession(str(digits_model_path), providers=["CPUExecutionProvider"])
    expected = session.run(None, {"input": ROWS})[0]
    np.testing.assert_array_equal(np.asarray(output["data"], dtype=np.float32).reshape(3, 10), expected)
    versioned = client.post("/v2/models/digits/versions/1.0/infer", json=body(ROWS))
    assert versioned.json()["outputs"] == answer["outputs"]


def test_health_and_metadata(served: tuple[Agent, httpx.Client]) -> None:
    _, client = served
    assert client.get("/v2/health/live").status_code == 200
    assert client.get("/v2/health/ready").status_code == 200
    server = client.get("/v2").json()
    assert server["name"] == "edgefleet-agent" and server["extensions"] == ["binary_tensor_data"]
    meta = client.get("/v2/models/digits").json()
    assert meta["versions"] == ["1.0"] and meta["platform"] == "onnxruntime_onnx"
    assert meta["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert client.get("/v2/models/digits/ready").json() == {"name": "digits", "ready": True}
    assert client.get("/v2/models/digits/versions/1.0/ready").status_code == 200


@pytest.mark.parametrize(
    ("request_body", "fragment"),
    [
        (body(ROWS, name="pixels"), "unknown input"),
        (body(ROWS, datatype="INT64", data=[1] * ROWS.size), "must be FP32"),
        (body(ROWS, shape=[3, 32, 2]), "shape"),
        (body(ROWS, data=ROWS.ravel().tolist()[:-1]), "191 values"),
        (body(ROWS, data=["a"] * ROWS.size), "not FP32"),
        ({"inputs": []}, "inputs"),
        ({**body(ROWS), "outputs": [{"name": "logits"}]}, "unknown output"),
    ],
    ids=[
        "wrong_name",
        "wrong_datatype",
        "wrong_shape",
        "data_length_mismatch",
        "non_numeric",
        "no_inputs",
        "bad_output",
    ],
)
def test_bad_request_is_a_400_with_a_message(
    served: tuple[Agent, httpx.Client], request_body: dict[str, object], fragment: str
) -> None:
    agent, client = served
    response = client.post("/v2/models/digits/infer", json=request_body)
    assert response.status_code == 400
    assert fragment in response.json()["error"]
    assert agent.infer({"input": ROWS})["probabilities"].shape == (3, 10)  # still serving


def test_body_that_is_not_json_is_a_400(served: tuple[Agent, httpx.Client]) -> None:
    _, client = served
    response = client.post("/v2/models/digits/infer", content=b"{nope", headers={"content-type": "application/json"})
    assert response.status_code == 400 and "not JSON" in response.json()["error"]


def test_unknown_model_or_version_is_a_404(served: tuple[Agent, httpx.Client]) -> None:
    _, client = served
    for path in ("/v2/models/cats/infer", "/v2/models/digits/versions/9.9/infer"):
        response = client.post(path, json=body(ROWS))
        assert response.status_code == 404 and "error" in response.json()
    assert client.get("/v2/models/cats").status_code == 404


def test_without_a_model_the_endpoint_is_live_but_not_ready(tmp_path: Path) -> None:
    agent = Agent(offline_config(tmp_path / "empty"))
    agent.start()
    try:
        url = agent.inference_url
        assert url is not None
        assert httpx.get(f"{url}/v2/health/live").status_code == 200
        assert httpx.get(f"{url}/v2/health/ready").status_code == 503
        response = httpx.post(f"{url}/v2/models/digits/infer", json=body(ROWS))
        assert response.status_code == 503 and "no model" in response.json()["error"]
    finally:
        agent.stop()
    assert agent.inference_url is None


def test_endpoint_can_be_disabled(tmp_path: Path) -> None:
    agent = Agent(offline_config(tmp_path / "quiet", http_port=None))
    agent.start()
    try:
        assert agent.inference_url is None
    finally:
        agent.stop()
