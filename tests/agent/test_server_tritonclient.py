"""Conformance: NVIDIA's own `tritonclient.http` talks to the agent's endpoint, with JSON and binary data."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import onnxruntime
import pytest

from tests.agent.test_server import ROWS, digits_serving, endpoint
from tests.services import require_module

triton = require_module("tritonclient.http", "the dev extra (tritonclient[http])", module_level=True)
from tritonclient.utils import InferenceServerException  # noqa: E402  (after the check that it is installed)

TOKEN = "t0ken-for-the-conformance-test"


def auth() -> dict[str, str]:
    """Fresh headers for each call: tritonclient adds Inference-Header-Content-Length to the dict it is given."""
    return {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, digits_model_bytes: bytes) -> Iterator[Any]:
    """A Triton HTTP client of the digits endpoint (token required, as beyond loopback)."""
    serving = digits_serving(tmp_path_factory.mktemp("triton"), digits_model_bytes)
    with endpoint(serving, token=TOKEN) as url:
        triton_client = triton.InferenceServerClient(urlsplit(url).netloc)
        yield triton_client
        triton_client.close()


@pytest.fixture(scope="module")
def expected(digits_model_bytes: bytes) -> np.ndarray:
    session = onnxruntime.InferenceSession(digits_model_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": ROWS})[0])


def test_tritonclient_sees_a_ready_server_with_the_binary_extension(client: Any) -> None:
    assert client.is_server_live() and client.is_server_ready()
    metadata = client.get_server_metadata(headers=auth())
    assert "binary_tensor_data" in metadata["extensions"]
    model = client.get_model_metadata("digits", headers=auth())
    assert model["inputs"] == [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
    assert client.is_model_ready("digits", headers=auth())


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary_in", "json_in"])
@pytest.mark.parametrize("binary_output", [True, False, None], ids=["binary_out", "json_out", "default_out"])
def test_tritonclient_infers_with_binary_and_json_data(
    client: Any, expected: np.ndarray, binary_input: bool, binary_output: bool | None
) -> None:
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=binary_input)
    # No outputs named: tritonclient asks for all of them as binary data (request-level binary_data_output).
    outputs = (
        None if binary_output is None else [triton.InferRequestedOutput("probabilities", binary_data=binary_output)]
    )
    result = client.infer("digits", [tensor], outputs=outputs, request_id="r-7", headers=auth())
    np.testing.assert_array_equal(result.as_numpy("probabilities"), expected)
    [output] = result.get_response()["outputs"]
    assert ("binary_data_size" in (output.get("parameters") or {})) is (binary_output is not False)
    assert result.get_response()["id"] == "r-7"


def test_tritonclient_without_the_token_is_refused(client: Any) -> None:
    tensor = triton.InferInput("input", list(ROWS.shape), "FP32")
    tensor.set_data_from_numpy(ROWS, binary_data=True)
    with pytest.raises(InferenceServerException, match="Bearer"):
        client.infer("digits", [tensor])


def test_tritonclient_sees_the_400_of_a_wrong_shape(client: Any) -> None:
    rows = np.zeros((2, 32), dtype=np.float32)
    tensor = triton.InferInput("input", [2, 32], "FP32")
    tensor.set_data_from_numpy(rows, binary_data=True)
    with pytest.raises(InferenceServerException, match="shape") as caught:
        client.infer("digits", [tensor], headers=auth())
    assert caught.value.status() == "400"
