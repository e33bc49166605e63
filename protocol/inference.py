"""Open Inference Protocol (KServe v2 REST) bodies, as the agent's local endpoint speaks them.

Applications written for Triton or KServe send these unchanged to `POST /v2/models/{name}/infer`.
`data` is the flattened, row-major tensor. With the *binary tensor data extension* a tensor has no
`data`: `parameters.binary_data_size` gives the byte length of its raw little-endian row-major bytes,
which follow the JSON header (`INFERENCE_HEADER_CONTENT_LENGTH` bytes long) in input or output order.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import Datatype, TensorSpec

# Length in bytes of the JSON part of a body whose binary tensor data follows it.
INFERENCE_HEADER_CONTENT_LENGTH = "Inference-Header-Content-Length"
# The name servers list in `ServerMetadata.extensions` when they speak the binary tensor data extension.
BINARY_TENSOR_DATA = "binary_tensor_data"


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InferTensor(_Body):
    """One input or output tensor of an inference request or response."""

    name: str
    shape: list[int]
    datatype: Datatype
    data: list[Any] | None = None  # None when the tensor travels as binary data (`binary_data_size`)
    parameters: dict[str, Any] | None = None


class RequestedOutput(_Body):
    """An output the client asks for by name."""

    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(_Body):
    """Body of `POST /v2/models/{name}[/versions/{version}]/infer`."""

    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[InferTensor] = Field(min_length=1)
    outputs: list[RequestedOutput] | None = None


class InferenceResponse(_Body):
    """Response to an inference request."""

    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[InferTensor]


class ModelMetadata(_Body):
    """Body of `GET /v2/models/{name}`."""

    name: str
    versions: list[str] = Field(default_factory=list)
    platform: str
    inputs: list[TensorSpec]
    outputs: list[TensorSpec]


class ServerMetadata(_Body):
    """Body of `GET /v2`."""

    name: str
    version: str
    extensions: list[str] = Field(default_factory=list)


class InferenceErrorBody(_Body):
    """Error body of the Open Inference Protocol."""

    error: str
