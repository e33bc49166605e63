"""Bodies of the inference route as bytes: JSON, and the binary tensor data extension. No IO.

A request body is a JSON header, followed, when `Inference-Header-Content-Length` gives the header's
length, by the raw bytes of every input whose `parameters.binary_data_size` is set, in input order.
An output travels the same way when the request asks for it (`binary_data` on the requested output,
else `binary_data_output` on the request). Binary tensor data is little-endian and row-major without
padding; a BOOL is one byte, 0 or 1. Every fault of the caller's body is an `InferenceInputError`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from pydantic import ValidationError

from agent.errors import InferenceFailedError, InferenceInputError
from agent.runtime import datatype_of, numpy_dtype
from protocol import Datatype
from protocol.inference import INFERENCE_HEADER_CONTENT_LENGTH, InferenceRequest, InferenceResponse, InferTensor

__all__ = ["DecodedRequest", "EncodedResponse", "decode_tensor", "encode_response", "encode_tensor", "read_request"]

_HEADER = INFERENCE_HEADER_CONTENT_LENGTH
_OCTET_STREAM = "application/octet-stream"


@dataclass(frozen=True)
class DecodedRequest:
    """An inference request, its inputs as arrays, and which outputs it wants as binary data."""

    body: InferenceRequest
    inputs: dict[str, np.ndarray]
    binary_by_default: bool
    binary_by_output: Mapping[str, bool]

    def wants_binary(self, output: str) -> bool:
        """True when `output` goes back as binary data rather than JSON."""
        return self.binary_by_output.get(output, self.binary_by_default)


@dataclass(frozen=True)
class EncodedResponse:
    """The bytes, media type and extra headers of an inference response."""

    content: bytes
    media_type: str
    headers: dict[str, str]


def read_request(raw: bytes, header_length: str | None) -> DecodedRequest:
    """Decode a request body; `header_length` is its `Inference-Header-Content-Length` header, if any."""
    header, binary = _split(raw, header_length)
    body = _parse_request(_json(header))
    return DecodedRequest(
        body=body,
        inputs=_decode_inputs(body.inputs, binary),
        binary_by_default=_flag(body.parameters, "binary_data_output", "the request") or False,
        binary_by_output=_output_flags(body),
    )


def _split(raw: bytes, header_length: str | None) -> tuple[memoryview, memoryview | None]:
    """The JSON header and the binary data after it (None without the header-length header)."""
    view = memoryview(raw)
    if header_length is None:
        return view, None
    value = header_length.strip()
    if not (value.isascii() and value.isdigit()):
        raise InferenceInputError(f"{_HEADER} must be a byte count, got {header_length!r}")
    length = int(value)
    if length > len(raw):
        raise InferenceInputError(f"{_HEADER} is {length}, but the body has only {len(raw)} bytes")
    return view[:length], view[length:]


def _json(header: memoryview) -> Any:
    try:
        text = str(header, "utf-8")
    except UnicodeDecodeError as exc:
        raise InferenceInputError(
            f"request body is not UTF-8 JSON: byte {exc.start} is not UTF-8 ({exc.reason})"
        ) from exc
    try:
        return json.loads(text)
    except RecursionError:
        raise InferenceInputError("request body is not usable JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, and integers too long to convert
        raise InferenceInputError(f"request body is not JSON: {exc}") from exc


def _parse_request(data: Any) -> InferenceRequest:
    """The inference request in a JSON value; refused when it is not one, or names an input twice."""
    try:
        body = InferenceRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise InferenceInputError(f"invalid inference request: {problems}") from exc
    names = [t.name for t in body.inputs]
    if len(set(names)) != len(names):
        raise InferenceInputError(f"duplicate input names in {names}")
    return body


def _flag(parameters: dict[str, Any] | None, key: str, owner: str) -> bool | None:
    value = (parameters or {}).get(key)
    if value is not None and not isinstance(value, bool):
        raise InferenceInputError(f"parameter {key!r} of {owner} must be true or false, got {value!r}")
    return value


def _output_flags(body: InferenceRequest) -> dict[str, bool]:
    flags = {o.name: _flag(o.parameters, "binary_data", f"output {o.name!r}") for o in body.outputs or []}
    return {name: flag for name, flag in flags.items() if flag is not None}


# -- inputs ------------------------------------------------------------------------------------------


def _decode_inputs(tensors: Sequence[InferTensor], binary: memoryview | None) -> dict[str, np.ndarray]:
    """Every input as an array, the binary ones cut from `binary` in order; all of `binary` must be used."""
    arrays: dict[str, np.ndarray] = {}
    offset = 0
    for tensor in tensors:
        size = _binary_size(tensor)
        if size is None:
            arrays[tensor.name] = decode_tensor(tensor)
            continue
        if binary is None:
            raise InferenceInputError(f"input {tensor.name!r} has binary_data_size but the request has no {_HEADER}")
        if size > len(binary) - offset:
            left = len(binary) - offset
            raise InferenceInputError(f"input {tensor.name!r}: binary_data_size is {size}, only {left} bytes are left")
        arrays[tensor.name] = _from_bytes(tensor, binary[offset : offset + size])
        offset += size
    if binary is not None and offset != len(binary):
        raise InferenceInputError(f"{len(binary) - offset} bytes after the JSON header belong to no input")
    return arrays


def _binary_size(tensor: InferTensor) -> int | None:
    """The input's `binary_data_size`, or None when its values are in `data`."""
    size = (tensor.parameters or {}).get("binary_data_size")
    if size is None:
        if tensor.data is None:
            raise InferenceInputError(f"input {tensor.name!r} has neither data nor parameters.binary_data_size")
        return None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise InferenceInputError(f"input {tensor.name!r}: binary_data_size must be a byte count, got {size!r}")
    if tensor.data is not None:
        raise InferenceInputError(f"input {tensor.name!r} has both data and binary_data_size; send one")
    return size


def _check_shape(tensor: InferTensor) -> int:
    if any(d < 0 for d in tensor.shape):
        raise InferenceInputError(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    return math.prod(tensor.shape)


def _from_bytes(tensor: InferTensor, data: memoryview) -> np.ndarray:
    """The array in an input's binary data: exactly elements * element size bytes, little-endian."""
    dtype = numpy_dtype(tensor.datatype)
    expected = _check_shape(tensor) * dtype.itemsize
    if len(data) != expected:
        raise InferenceInputError(
            f"input {tensor.name!r}: binary_data_size is {len(data)} bytes, "
            f"shape {tensor.shape} of {tensor.datatype.value} needs {expected}"
        )
    if tensor.datatype is Datatype.BOOL and bool((np.frombuffer(data, dtype=np.uint8) > 1).any()):
        raise InferenceInputError(f"input {tensor.name!r}: BOOL binary data must be bytes 0 or 1")
    array = np.frombuffer(data, dtype=dtype.newbyteorder("<")).astype(dtype, copy=False)
    if not array.flags.aligned:  # the JSON header's length can leave the data at any offset
        array = array.copy()
    return array.reshape(tensor.shape)


def decode_tensor(tensor: InferTensor) -> np.ndarray:
    """The numpy array of a JSON request tensor; `InferenceInputError` when data and shape disagree."""
    expected = _check_shape(tensor)
    if tensor.data is None:
        raise InferenceInputError(f"input {tensor.name!r} has no data")
    try:
        array = np.asarray(tensor.data, dtype=numpy_dtype(tensor.datatype)).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InferenceInputError(f"input {tensor.name!r}: data is not {tensor.datatype.value} ({exc})") from exc
    if array.size != expected:
        raise InferenceInputError(
            f"input {tensor.name!r}: {array.size} values in data, shape {tensor.shape} needs {expected}"
        )
    return array.reshape(tensor.shape)


# -- outputs -----------------------------------------------------------------------------------------


def encode_tensor(name: str, array: np.ndarray) -> InferTensor:
    """A JSON response tensor: row-major flattened data with the Open Inference Protocol datatype."""
    return InferTensor(
        name=name, shape=list(array.shape), datatype=datatype_of(array.dtype), data=array.ravel().tolist()
    )


def _binary_tensor(name: str, array: np.ndarray) -> tuple[InferTensor, bytes]:
    data = array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes(order="C")
    tensor = InferTensor(
        name=name,
        shape=list(array.shape),
        datatype=datatype_of(array.dtype),
        parameters={"binary_data_size": len(data)},
    )
    return tensor, data


def encode_response(
    request: DecodedRequest, outputs: Sequence[tuple[str, np.ndarray]], *, model_name: str, model_version: str
) -> EncodedResponse:
    """The response body: JSON, or the JSON header and then each binary output's bytes in output order."""
    tensors: list[InferTensor] = []
    binary: list[bytes] = []
    for name, array in outputs:
        if request.wants_binary(name):
            tensor, data = _binary_tensor(name, array)
            binary.append(data)
        else:
            tensor = encode_tensor(name, array)
        tensors.append(tensor)
    response = InferenceResponse(
        model_name=model_name, model_version=model_version, id=request.body.id, outputs=tensors
    )
    header = _render(response.model_dump(mode="json", exclude_none=True))
    if not binary:
        return EncodedResponse(header, "application/json", {})
    return EncodedResponse(header + b"".join(binary), _OCTET_STREAM, {_HEADER: str(len(header))})


def _render(content: Any) -> bytes:
    # `model_dump(mode="json")` has already written NaN and infinity as null; never emit a bare NaN token.
    try:
        text = json.dumps(content, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    except ValueError as exc:
        raise InferenceFailedError(f"model output is not representable as JSON ({exc})") from exc
    return text.encode("utf-8")
