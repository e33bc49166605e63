"""Open Inference Protocol (KServe v2 REST) bodies, as the agent's local endpoint speaks them.

Applications written for Triton or KServe send these unchanged to `POST /v2/models/{name}/infer`.
Only JSON tensor data is supported (no binary extension); `data` is the flattened, row-major tensor.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from protocol.messages import Datatype, TensorSpec


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class InferTensor(_Body):
    """One input or output tensor of an inference request or response."""

    name: str
    shape: list[int]
    datatype: Datatype
    data: list[Any]
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
