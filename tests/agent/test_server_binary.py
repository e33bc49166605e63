"""The binary tensor data extension over real uvicorn and ONNX Runtime: raw requests built per the spec.

Spec: https://github.com/triton-inference-server/server/blob/main/docs/protocol/extension_binary_data.md
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper

from agent.runtime import OnnxRuntime
from agent.serving import ActiveModel, Serving
from protocol import ArtifactRef, ModelSpec, TensorSpec
from tests.agent.test_server import ROWS, digits_serving, endpoint

HEADER = "Inference-Header-Content-Length"
# Every datatype the agent serves, with the ONNX element type of an identity model's tensors.
DATATYPES = {
    "BOOL": TensorProto.BOOL,
    "UINT8": TensorProto.UINT8,
    "INT8": TensorProto.INT8,
    "INT16": TensorProto.INT16,
    "INT32": TensorProto.INT32,
    "INT64": TensorProto.INT64,
    "FP16": TensorProto.FLOAT16,
    "FP32": TensorProto.FLOAT,
    "FP64": TensorProto.DOUBLE,
}


def binary_request(
    header: dict[str, Any], *tensors: bytes, declared: int | None = None
) -> tuple[bytes, dict[str, str]]:
    """A body of the JSON header followed by the tensors' bytes, and its Inference-Header-Content-Length."""
    raw = json.dumps(header).encode()
    return raw + b"".join(tensors), {HEADER: str(len(raw) if declared is None else declared)}


def split_response(response: httpx.Response) -> tuple[dict[str, Any], dict[str, bytes]]:
    """The JSON header of a binary response and each binary output's bytes, by output name."""
    length = int(response.headers[HEADER])
    header = json.loads(response.content[:length])
    rest, offset, binaries = response.content[length:], 0, {}
    for output in header["outputs"]:
        size = (output.get("parameters") or {}).get("binary_data_size")
        if size is not None:
            binaries[output["name"]] = rest[offset : offset + size]
            offset += size
    assert offset == len(rest)
    return header, binaries


def identity_model(path: Path) -> Serving:
    """A served ONNX model with one `<DATATYPE>` input per datatype, each returned as `<DATATYPE>_out`."""
    inputs = [helper.make_tensor_value_info(name, kind, ["n", 3]) for name, kind in DATATYPES.items()]
    outputs = [helper.make_tensor_value_info(f"{name}_out", kind, ["n", 3]) for name, kind in DATATYPES.items()]
    nodes = [helper.make_node("Identity", [name], [f"{name}_out"]) for name in DATATYPES]
    graph = helper.make_graph(nodes, "identity", inputs, outputs)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), path)
    loaded = OnnxRuntime().load(path)
    data = path.read_bytes()
    spec = ModelSpec(
        name="identity",
        version="1",
        artifact=ArtifactRef(url="http://127.0.0.1:9/unused", sha256="0" * 64, size=len(data)),
        inputs=[TensorSpec(name=n, datatype=n, shape=[-1, 3]) for n in DATATYPES],
        outputs=[TensorSpec(name=f"{n}_out", datatype=n, shape=[-1, 3]) for n in DATATYPES],
    )
    serving = Serving()
    serving.swap(ActiveModel(spec=spec, model=loaded))
    return serving


def sample(datatype: str) -> np.ndarray:
    """Two rows of three values that use each type's range (negative, extreme, fractional)."""
    if datatype == "BOOL":
        return np.array([[True, False, True], [False, False, True]])
    dtype = np.dtype({"FP16": "float16", "FP32": "float32", "FP64": "float64"}.get(datatype, datatype.lower()))
    if dtype.kind == "f":
        return np.array([[-1.5, 0.0, 3.25], [np.finfo(dtype).max, np.finfo(dtype).tiny, -2.0]], dtype=dtype)
    info = np.iinfo(dtype)
    return np.array([[info.min, 0, info.max], [1, info.max - 1, info.min + 1]], dtype=dtype)


@pytest.fixture(scope="module")
def digits_url(tmp_path_factory: pytest.TempPathFactory, digits_model_bytes: bytes) -> Iterator[str]:
    with endpoint(digits_serving(tmp_path_factory.mktemp("binary"), digits_model_bytes)) as url:
        yield url


@pytest.fixture(scope="module")
def identity_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with endpoint(identity_model(tmp_path_factory.mktemp("identity") / "identity.onnx")) as url:
        yield url


@pytest.fixture(scope="module")
def expected(digits_model_bytes: bytes) -> np.ndarray:
    session = onnxruntime.InferenceSession(digits_model_bytes, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": ROWS})[0])


def digits_input(binary: bool) -> tuple[dict[str, Any], bytes]:
    tensor: dict[str, Any] = {"name": "input", "shape": [3, 64], "datatype": "FP32"}
    if not binary:
        return {**tensor, "data": ROWS.ravel().tolist()}, b""
    return {**tensor, "parameters": {"binary_data_size": ROWS.nbytes}}, ROWS.astype("<f4").tobytes()


def test_binary_request_and_response_round_trip(digits_url: str, expected: np.ndarray) -> None:
    tensor, data = digits_input(binary=True)
    header = {
        "id": "b-1",
        "inputs": [tensor],
        "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}],
    }
    content, headers = binary_request(header, data)
    response = httpx.post(f"{digits_url}/v2/models/digits/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/octet-stream"
    assert int(response.headers["content-length"]) == len(response.content)
    answer, binaries = split_response(response)
    assert answer["id"] == "b-1" and answer["model_name"] == "digits"
    [output] = answer["outputs"]
    assert output == {
        "name": "probabilities",
        "shape": [3, 10],
        "datatype": "FP32",
        "parameters": {"binary_data_size": 120},
    }
    np.testing.assert_array_equal(np.frombuffer(binaries["probabilities"], "<f4").reshape(3, 10), expected)


@pytest.mark.parametrize("binary_input", [True, False], ids=["binary_in", "json_in"])
@pytest.mark.parametrize(
    ("request_parameters", "output_parameters", "binary_output"),
    [
        (None, None, False),
        ({"binary_data_output": True}, None, True),
        ({"binary_data_output": True}, {"binary_data": False}, False),
        ({"binary_data_output": False}, {"binary_data": True}, True),
        (None, {"binary_data": False}, False),
    ],
    ids=["json_default", "request_level", "output_overrides_off", "output_overrides_on", "output_off"],
)
def test_each_output_travels_as_the_request_asks(
    digits_url: str,
    expected: np.ndarray,
    binary_input: bool,
    request_parameters: dict[str, Any] | None,
    output_parameters: dict[str, Any] | None,
    binary_output: bool,
) -> None:
    tensor, data = digits_input(binary_input)
    header: dict[str, Any] = {"inputs": [tensor], "parameters": request_parameters}
    if output_parameters is not None:
        header["outputs"] = [{"name": "probabilities", "parameters": output_parameters}]
    content, headers = binary_request(header, data) if binary_input else (json.dumps(header).encode(), {})
    response = httpx.post(f"{digits_url}/v2/models/digits/infer", content=content, headers=headers)
    assert response.status_code == 200, response.text
    if binary_output:
        _, binaries = split_response(response)
        values = np.frombuffer(binaries["probabilities"], "<f4")
    else:
        assert response.headers["content-type"] == "application/json" and HEADER not in response.headers
        values = np.asarray(response.json()["outputs"][0]["data"], dtype=np.float32)
    np.testing.assert_array_equal(values.reshape(3, 10), expected)


def le_bytes(array: np.ndarray) -> bytes:
    """The spec's layout: little-endian, row-major, no padding."""
    return array.astype(array.dtype.newbyteorder("<")).tobytes()


def post_identity(
    url: str, arrays: dict[str, np.ndarray], *, as_json: tuple[str, ...] = (), **header: Any
) -> httpx.Response:
    """Send every datatype's array to the identity model: as binary data, but the `as_json` ones as JSON."""
    inputs, data = [], []
    for name, array in arrays.items():
        tensor: dict[str, Any] = {"name": name, "shape": list(array.shape), "datatype": name}
        if name in as_json:
            inputs.append({**tensor, "data": array.ravel().tolist()})
        else:
            inputs.append({**tensor, "parameters": {"binary_data_size": array.nbytes}})
            data.append(le_bytes(array))
    content, headers = binary_request({"inputs": inputs, **header}, *data)
    return httpx.post(f"{url}/v2/models/identity/infer", content=content, headers=headers)


def test_every_served_datatype_round_trips_as_binary_data(identity_url: str) -> None:
    arrays = {name: sample(name) for name in DATATYPES}  # BOOL's 6 bytes leave the next tensor unaligned
    response = post_identity(identity_url, arrays, parameters={"binary_data_output": True})
    assert response.status_code == 200, response.text
    answer, binaries = split_response(response)
    assert [o["name"] for o in answer["outputs"]] == [f"{n}_out" for n in DATATYPES]
    for output in answer["outputs"]:
        name = output["name"].removesuffix("_out")
        assert output["datatype"] == name and output["shape"] == [2, 3]
        assert binaries[output["name"]] == le_bytes(arrays[name])


def test_binary_and_json_inputs_mix_in_one_request(identity_url: str) -> None:
    arrays = {name: sample(name) for name in DATATYPES}
    response = post_identity(identity_url, arrays, as_json=tuple(DATATYPES)[1::2])
    assert response.status_code == 200, response.text
    for output in response.json()["outputs"]:
        name = output["name"].removesuffix("_out")
        np.testing.assert_array_equal(np.asarray(output["data"], dtype=arrays[name].dtype).reshape(2, 3), arrays[name])


def test_nan_output_survives_only_as_binary_data(identity_url: str) -> None:
    arrays = {name: sample(name) for name in DATATYPES}
    arrays["FP32"] = np.array([[np.nan, np.inf, -np.inf], [0.0, 1.0, 2.0]], dtype=np.float32)
    as_binary = post_identity(identity_url, arrays, parameters={"binary_data_output": True})
    assert as_binary.status_code == 200, as_binary.text
    assert split_response(as_binary)[1]["FP32_out"] == le_bytes(arrays["FP32"])
    as_json = post_identity(identity_url, arrays)  # JSON has no NaN or infinity: pydantic writes null
    [fp32] = [o for o in as_json.json()["outputs"] if o["name"] == "FP32_out"]
    assert fp32["data"] == [None, None, None, 0.0, 1.0, 2.0]


def fp32_input(size: int) -> dict[str, Any]:
    return {"name": "input", "shape": [3, 64], "datatype": "FP32", "parameters": {"binary_data_size": size}}


ROW_BYTES = ROWS.astype("<f4").tobytes()


def case(case_id: str, header: dict[str, Any], tensors: list[bytes], fragment: str, declared: int | None = None) -> Any:
    return pytest.param(header, tensors, declared, fragment, id=case_id)


JUST_INPUT = {"inputs": [fp32_input(768)]}
ASK_BINARY_AS_INT = [{"name": "probabilities", "parameters": {"binary_data": 1}}]


@pytest.mark.parametrize(
    ("header", "tensors", "declared", "fragment"),
    [
        case("size_not_shape_times_dtype", {"inputs": [fp32_input(760)]}, [ROW_BYTES[:760]], "needs 768"),
        case("header_length_past_the_body", JUST_INPUT, [ROW_BYTES], "the body has only", declared=10**6),
        case("leftover_bytes", JUST_INPUT, [ROW_BYTES, b"\0" * 4], "4 bytes after the JSON header"),
        case("size_past_the_body", JUST_INPUT, [ROW_BYTES[:700]], "only 700 bytes are left"),
        case("negative_size", {"inputs": [fp32_input(-1)]}, [ROW_BYTES], "must be a byte count"),
        case("boolean_size", {"inputs": [fp32_input(True)]}, [ROW_BYTES], "must be a byte count"),
        case("data_and_binary", {"inputs": [{**fp32_input(768), "data": [0.0] * 192}]}, [ROW_BYTES], "send one"),
        case("no_data_at_all", {"inputs": [{**fp32_input(768), "parameters": None}]}, [ROW_BYTES], "neither data"),
        case("request_flag_not_bool", {**JUST_INPUT, "parameters": {"binary_data_output": "yes"}}, [ROW_BYTES], "true"),
        case("output_flag_not_bool", {**JUST_INPUT, "outputs": ASK_BINARY_AS_INT}, [ROW_BYTES], "true or false"),
    ],
)
def test_binary_size_mismatch_is_a_400(
    digits_url: str, header: dict[str, Any], tensors: list[bytes], declared: int | None, fragment: str
) -> None:
    content, headers = binary_request(header, *tensors, declared=declared)
    response = httpx.post(f"{digits_url}/v2/models/digits/infer", content=content, headers=headers)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]


@pytest.mark.parametrize("value", ["-5", "12abc", "0x10", ""], ids=["negative", "junk", "hex", "empty"])
def test_header_length_that_is_not_a_byte_count_is_a_400(digits_url: str, value: str) -> None:
    content, _ = binary_request({"inputs": [fp32_input(768)]}, ROW_BYTES)
    response = httpx.post(f"{digits_url}/v2/models/digits/infer", content=content, headers={HEADER: value})
    assert response.status_code == 400 and HEADER in response.json()["error"]


def test_binary_input_without_the_header_length_is_a_400(digits_url: str) -> None:
    response = httpx.post(f"{digits_url}/v2/models/digits/infer", json={"inputs": [fp32_input(768)]})
    assert response.status_code == 400 and f"has no {HEADER}" in response.json()["error"]


def test_bool_bytes_other_than_0_and_1_are_a_400(identity_url: str) -> None:
    arrays = {name: sample(name) for name in DATATYPES}
    arrays["BOOL"] = np.frombuffer(b"\x00\x01\x02\x00\x01\x00", dtype=np.bool_).reshape(2, 3)  # a 2 is no bool
    response = post_identity(identity_url, arrays)
    assert response.status_code == 400 and "BOOL binary data must be bytes 0 or 1" in response.json()["error"]
