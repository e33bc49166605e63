"""A full-int8 TFLite model through the whole update path answers like the ONNX model of the same network.

The reference CNN is trained once per session (`compression.cnn`), exported to ONNX and converted to
`tflite-int8` (`compression.variants`: int8 input and output tensors). Both are deployed to a real agent
over a real broker and HTTP, and queried through its Open Inference Protocol endpoint with the same
FP32 requests: the agent quantizes and dequantizes the TFLite model's I/O itself.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import pytest

from agent import Agent
from agent.runtime import LiteRtRuntime, OnnxRuntime
from protocol import ArtifactRef, Datatype, ModelFormat, ModelSpec
from simulators.faults import FaultyArtifactServer
from tests.agent.conftest import AgentFactory, Observer
from tests.services import require_convert_extra

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

SAMPLES = 60


@dataclass(frozen=True)
class CnnFiles:
    onnx: Path
    tflite_int8: Path
    x: np.ndarray  # held-out digits as [n, 1, 8, 8]


@pytest.fixture(scope="session")
def cnn_files(tmp_path_factory: pytest.TempPathFactory) -> CnnFiles:
    """The CNN's ONNX and int8 TFLite files: prebuilt (`EDGEFLEET_TFLITE_FIXTURE_DIR`, see
    `build_tflite_fixture`) in an environment without torch, else built now."""
    prebuilt = os.environ.get("EDGEFLEET_TFLITE_FIXTURE_DIR")
    if prebuilt:
        root = Path(prebuilt)
        return CnnFiles(root / "digits-cnn.onnx", root / "digits-cnn-int8.tflite", np.load(root / "x.npy"))
    require_convert_extra()
    from tests.agent.build_tflite_fixture import build

    out = tmp_path_factory.mktemp("cnn")
    build(out)
    return CnnFiles(out / "digits-cnn.onnx", out / "digits-cnn-int8.tflite", np.load(out / "x.npy"))


def test_tflite_runtime_is_the_one_this_environment_should_use() -> None:
    """The legacy venv must exercise tflite_runtime, not a LiteRT that happens to be installed too."""
    expected = os.environ.get("EDGEFLEET_EXPECT_TFLITE_BACKEND", "litert")
    assert LiteRtRuntime().name.partition("-")[0] == expected


@pytest.fixture
def broker_url(mosquitto_url: str) -> str:
    return mosquitto_url


def spec_for(server: FaultyArtifactServer, path: Path, version: str, fmt: ModelFormat) -> ModelSpec:
    """The spec a coordinator declares for the file: its tensors as the device's runtime reads them."""
    data = path.read_bytes()
    model = (LiteRtRuntime() if fmt is ModelFormat.TFLITE else OnnxRuntime()).load(path)
    url = server.publish(f"digits-cnn-{version}.{fmt.value}", data)
    return ModelSpec(
        name="digits-cnn",
        version=version,
        artifact=ArtifactRef(url=url, sha256=hashlib.sha256(data).hexdigest(), size=len(data), format=fmt),
        inputs=model.inputs,
        outputs=model.outputs,
    )


def endpoint_logits(agent: Agent, spec: ModelSpec, x: np.ndarray) -> np.ndarray:
    """Logits of every sample, one FP32 request each, through the agent's HTTP endpoint."""
    [tensor_in], [tensor_out] = spec.inputs, spec.outputs
    rows = []
    with httpx.Client(base_url=str(agent.inference_url), timeout=10) as client:
        for sample in x:
            body = {
                "inputs": [
                    {"name": tensor_in.name, "shape": [1, 1, 8, 8], "datatype": "FP32", "data": sample.ravel().tolist()}
                ]
            }
            response = client.post(f"/v2/models/{spec.name}/versions/{spec.version}/infer", json=body)
            assert response.status_code == 200, response.text
            [out] = response.json()["outputs"]
            assert out["name"] == tensor_out.name and out["datatype"] == "FP32"
            rows.append(np.asarray(out["data"], dtype=np.float32).reshape(out["shape"]))
    return np.concatenate(rows)


def test_int8_tflite_model_deployed_through_the_update_path_predicts_like_the_onnx_model(
    make_agent: AgentFactory, server: FaultyArtifactServer, observer: Observer, cnn_files: CnnFiles
) -> None:
    agent = make_agent(http_port=0)
    agent.start()
    onnx_spec = spec_for(server, cnn_files.onnx, "1.0-onnx", ModelFormat.ONNX)
    observer.desire("dev-1", 1, onnx_spec)
    assert agent.wait_for_model("1.0-onnx", 30), f"ONNX model not active: {agent.update_status}"
    onnx_logits = endpoint_logits(agent, onnx_spec, cnn_files.x)

    tflite_spec = spec_for(server, cnn_files.tflite_int8, "1.0-tflite-int8", ModelFormat.TFLITE)
    assert all(t.datatype is Datatype.FP32 for t in tflite_spec.inputs + tflite_spec.outputs)
    observer.desire("dev-1", 2, tflite_spec)
    assert agent.wait_for_model("1.0-tflite-int8", 60), f"TFLite model not active: {agent.update_status}"
    reported = observer.reported("dev-1", lambda r: r.active_model == tflite_spec.ref)
    assert os.environ.get("EDGEFLEET_EXPECT_TFLITE_BACKEND", "litert") in reported.capabilities.runtimes
    tflite_logits = endpoint_logits(agent, tflite_spec, cnn_files.x)

    agreement = float(np.mean(onnx_logits.argmax(1) == tflite_logits.argmax(1)))
    assert agreement >= 0.95, f"int8 TFLite agrees with ONNX on only {agreement:.0%} of {SAMPLES} digits"
    # Dequantized logits are on the ONNX model's scale, not raw int8 codes.
    assert np.max(np.abs(tflite_logits - onnx_logits)) < 0.25 * np.max(np.abs(onnx_logits))
