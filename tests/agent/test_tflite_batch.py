"""Every variant of a version serves the same requests: TFLite models, converted for a fixed batch, answer any batch.

Real LiteRT models made here with litert-torch: compress's own `tflite-int8` of a small CNN (batch 1, int8
I/O, a RESHAPE to a constant shape, so the interpreter cannot be resized and batches are run in chunks), a
Linear + Softmax classifier (resizable), the CNN converted for a batch of 2 (chunks of 2, the last padded)
and a model whose output has no batch axis (served at its own batch only, with a clear error otherwise).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from agent import InferenceInputError
from agent.runtime import LiteRtModel, LiteRtRuntime
from agent.server import InferenceServer, create_app
from agent.serving import ActiveModel, Serving
from protocol import ArtifactRef, ModelFormat, ModelSpec
from tests.services import require_convert_extra

pytestmark = pytest.mark.slow

ROWS = np.random.default_rng(3).random((5, 1, 8, 8), dtype=np.float32)


@dataclass(frozen=True)
class TfliteCase:
    path: Path
    input_name: str
    output_name: str
    mode: str  # the batching the runtime should choose
    sample_shape: tuple[int, ...] = (1, 8, 8)

    def rows(self, n: int) -> np.ndarray:
        return ROWS[:n].reshape(n, *self.sample_shape)


def _cnn(torch: Any) -> Any:
    torch.manual_seed(0)
    nn = torch.nn
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 10)).eval()


@pytest.fixture(scope="module")
def tflite_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, TfliteCase]:
    """The four models, converted once per module (a few seconds each)."""
    torch, litert_torch = require_convert_extra()
    litert_torch.config.show_progress = False
    from compression.data import Dataset
    from compression.variants import build_variant

    out = tmp_path_factory.mktemp("tflite-batch")
    calibration = Dataset(np.random.default_rng(0).random((64, 64), dtype=np.float32), None, "random")
    cnn = _cnn(torch)
    torch.export.save(torch.export.export(cnn, (torch.zeros(1, 1, 8, 8),)), str(out / "cnn-b1.pt2"))
    torch.export.save(torch.export.export(cnn, (torch.zeros(2, 1, 8, 8),)), str(out / "cnn-b2.pt2"))
    int8 = build_variant(
        "tflite-int8", onnx_model=None, torch_program=out / "cnn-b1.pt2", calibration=calibration, out_dir=out / "i8"
    )
    batch2 = build_variant(
        "tflite-fp32", onnx_model=None, torch_program=out / "cnn-b2.pt2", calibration=calibration, out_dir=out / "b2"
    )
    linear = torch.nn.Sequential(torch.nn.Linear(64, 10), torch.nn.Softmax(dim=1)).eval()
    litert_torch.convert(linear, (torch.zeros(1, 64),)).export(str(out / "linear.tflite"))

    class Total(torch.nn.Module):
        def forward(self, x: Any) -> Any:
            return x.sum()  # a scalar: no batch axis to follow

    litert_torch.convert(Total().eval(), (torch.zeros(1, 1, 8, 8),)).export(str(out / "total.tflite"))
    return {
        "tflite-int8": TfliteCase(int8.path, "input", "logits", "split"),
        "linear": TfliteCase(out / "linear.tflite", "args_0", "output_0", "resize", (64,)),
        "batch-2": TfliteCase(batch2.path, "input", "logits", "split"),
        "total": TfliteCase(out / "total.tflite", "args_0", "output_0", "fixed"),
    }


def _one_at_a_time(model: LiteRtModel, case: TfliteCase, n: int) -> np.ndarray:
    rows = case.rows(n)
    return np.concatenate([model.infer({case.input_name: rows[i : i + 1]})[case.output_name] for i in range(n)])


@pytest.mark.parametrize("name", ["tflite-int8", "linear", "batch-2"])
def test_tflite_variant_serves_batches_of_1_and_3_like_one_sample_at_a_time(
    name: str, tflite_models: dict[str, TfliteCase]
) -> None:
    case = tflite_models[name]
    model = LiteRtRuntime().load(case.path)
    assert model.batching.mode == case.mode
    assert model.inputs[0].shape == [-1, *case.sample_shape] and model.outputs[0].shape == [-1, 10]  # any batch
    expected = _one_at_a_time(model, case, len(ROWS))
    for batch in (1, 3, 5, 2, 1):
        got = model.infer({case.input_name: case.rows(batch)})[case.output_name]
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, expected[:batch], rtol=1e-5, atol=1e-5)


def test_tflite_model_without_a_batch_axis_answers_another_batch_with_its_limit(
    tflite_models: dict[str, TfliteCase],
) -> None:
    case = tflite_models["total"]
    model = LiteRtRuntime().load(case.path)
    assert model.batching.mode == "fixed" and model.inputs[0].shape == [1, 1, 8, 8]
    assert model.infer({case.input_name: ROWS[:1]})[case.output_name] == pytest.approx(float(ROWS[0].sum()), rel=1e-5)
    with pytest.raises(InferenceInputError, match=r"batch of 3; this TFLite model serves a batch of exactly 1"):
        model.infer({case.input_name: ROWS[:3]})


def _spec(path: Path, model: LiteRtModel, version: str) -> ModelSpec:
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    artifact = ArtifactRef(url="http://127.0.0.1:9/u", sha256=digest, size=len(data), format=ModelFormat.TFLITE)
    return ModelSpec(name="cnn", version=version, artifact=artifact, inputs=model.inputs, outputs=model.outputs)


@pytest.fixture
def endpoint_of(tflite_models: dict[str, TfliteCase]) -> Iterator[Any]:
    """Serve one of the models through the agent's Open Inference Protocol app on real uvicorn."""
    servers: list[InferenceServer] = []

    def serve(name: str) -> str:
        case = tflite_models[name]
        model = LiteRtRuntime().load(case.path)
        serving = Serving()
        serving.swap(ActiveModel(spec=_spec(case.path, model, "1.0"), model=model))
        server = InferenceServer(create_app(serving), host="127.0.0.1", port=0, name="test")
        servers.append(server)
        return server.start()

    yield serve
    for server in servers:
        server.stop()


def _request(rows: np.ndarray, name: str) -> dict[str, Any]:
    return {"inputs": [{"name": name, "shape": list(rows.shape), "datatype": "FP32", "data": rows.ravel().tolist()}]}


def test_agent_endpoint_answers_a_batch_of_3_from_the_int8_tflite_variant(
    endpoint_of: Any, tflite_models: dict[str, TfliteCase]
) -> None:
    case = tflite_models["tflite-int8"]
    with httpx.Client(base_url=endpoint_of("tflite-int8"), timeout=10) as client:
        one = client.post("/v2/models/cnn/versions/1.0/infer", json=_request(ROWS[:1], case.input_name))
        three = client.post("/v2/models/cnn/versions/1.0/infer", json=_request(ROWS[:3], case.input_name))
        metadata = client.get("/v2/models/cnn").json()
    assert one.status_code == 200 and three.status_code == 200, three.text
    [first], [batch] = one.json()["outputs"], three.json()["outputs"]
    assert first["shape"] == [1, 10] and batch["shape"] == [3, 10]
    np.testing.assert_allclose(batch["data"][:10], first["data"], rtol=1e-5, atol=1e-5)
    assert metadata["inputs"][0]["shape"] == [-1, 1, 8, 8]


def test_agent_endpoint_answers_400_naming_the_limit_of_a_model_without_a_batch_axis(
    endpoint_of: Any, tflite_models: dict[str, TfliteCase]
) -> None:
    case = tflite_models["total"]
    with httpx.Client(base_url=endpoint_of("total"), timeout=10) as client:
        response = client.post("/v2/models/cnn/versions/1.0/infer", json=_request(ROWS[:3], case.input_name))
    assert response.status_code == 400
    assert "serves a batch of exactly 1" in response.json()["error"]
