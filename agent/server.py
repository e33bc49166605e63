"""The local inference endpoint: Open Inference Protocol (KServe v2 REST) on `http_host:http_port`.

Applications written for Triton or KServe talk to it unchanged. Errors are `{"error": "..."}` with
400 (the request does not fit the model), 404 (unknown model or version), 503 (no model loaded yet).
"""

from __future__ import annotations

import json
import logging
import math
import socket
import threading
from typing import Any

import numpy as np
import uvicorn
from pydantic import ValidationError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent.errors import ConfigError, InferenceFailedError, InferenceInputError, NoModelError
from agent.runtime import datatype_of, numpy_dtype
from agent.serving import ActiveModel, Serving
from protocol import ModelFormat
from protocol.inference import (
    InferenceRequest,
    InferenceResponse,
    InferTensor,
    ModelMetadata,
    ServerMetadata,
)

__all__ = ["InferenceServer", "create_app", "decode_tensor", "encode_tensor"]

log = logging.getLogger(__name__)

_PLATFORMS = {ModelFormat.ONNX: "onnxruntime_onnx", ModelFormat.TFLITE: "tensorflow_lite"}


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def decode_tensor(tensor: InferTensor) -> np.ndarray:
    """The numpy array of a request tensor; `InferenceInputError` when data and shape disagree."""
    if any(d < 0 for d in tensor.shape):
        raise InferenceInputError(f"input {tensor.name!r}: shape {tensor.shape} has a negative dimension")
    try:
        array = np.asarray(tensor.data, dtype=numpy_dtype(tensor.datatype)).reshape(-1)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InferenceInputError(f"input {tensor.name!r}: data is not {tensor.datatype.value} ({exc})") from exc
    expected = math.prod(tensor.shape)
    if array.size != expected:
        raise InferenceInputError(
            f"input {tensor.name!r}: {array.size} values in data, shape {tensor.shape} needs {expected}"
        )
    return array.reshape(tensor.shape)


def encode_tensor(name: str, array: np.ndarray) -> InferTensor:
    """A response tensor: row-major flattened data with the Open Inference Protocol datatype."""
    return InferTensor(
        name=name, shape=list(array.shape), datatype=datatype_of(array.dtype), data=array.ravel().tolist()
    )


def _model_for(serving: Serving, request: Request) -> ActiveModel:
    active = serving.current()
    if active is None:
        raise _HttpError(503, "no model is loaded yet")
    name = request.path_params["name"]
    version = request.path_params.get("version")
    if name != active.spec.name:
        raise _HttpError(404, f"unknown model {name!r}; this device serves {active.spec.name!r}")
    if version is not None and version != active.spec.version:
        raise _HttpError(404, f"model {name!r} has no version {version!r}; serving {active.spec.version!r}")
    return active


async def _infer(serving: Serving, request: Request) -> Response:
    active = _model_for(serving, request)
    try:
        body = InferenceRequest.model_validate(await request.json())
    except json.JSONDecodeError as exc:
        raise _HttpError(400, f"request body is not JSON: {exc}") from exc
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise _HttpError(400, f"invalid inference request: {problems}") from exc
    names = [t.name for t in body.inputs]
    if len(set(names)) != len(names):
        raise _HttpError(400, f"duplicate input names in {names}")
    inputs = {t.name: decode_tensor(t) for t in body.inputs}
    outputs = await run_in_threadpool(serving.infer, inputs, active)
    wanted = [o.name for o in body.outputs] if body.outputs else list(outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise _HttpError(400, f"unknown output(s) {unknown}; the model has {list(outputs)}")
    response = InferenceResponse(
        model_name=active.spec.name,
        model_version=active.spec.version,
        id=body.id,
        outputs=[encode_tensor(name, outputs[name]) for name in wanted],
    )
    try:
        return JSONResponse(response.model_dump(mode="json", exclude_none=True))
    except ValueError as exc:  # NaN/Inf cannot be written as JSON
        raise _HttpError(500, f"model output is not representable as JSON: {exc}") from exc


def create_app(serving: Serving, *, version: str = "0") -> Starlette:
    """The Starlette app of the endpoint for one agent's `serving`."""

    async def live(_request: Request) -> Response:
        return JSONResponse({"live": True})

    async def ready(_request: Request) -> Response:
        if serving.current() is None:
            return _error(503, "no model is loaded yet")
        return JSONResponse({"ready": True})

    async def server_metadata(_request: Request) -> Response:
        return JSONResponse(ServerMetadata(name="edgefleet-agent", version=version).model_dump(mode="json"))

    async def model_metadata(request: Request) -> Response:
        active = _model_for(serving, request)
        body = ModelMetadata(
            name=active.spec.name,
            versions=[active.spec.version],
            platform=_PLATFORMS.get(active.spec.artifact.format, active.spec.artifact.format.value),
            inputs=active.model.inputs,
            outputs=active.model.outputs,
        )
        return JSONResponse(body.model_dump(mode="json"))

    async def model_ready(request: Request) -> Response:
        active = _model_for(serving, request)
        return JSONResponse({"name": active.spec.name, "ready": True})

    async def infer(request: Request) -> Response:
        return await _infer(serving, request)

    routes = [
        Route("/v2/health/live", live),
        Route("/v2/health/ready", ready),
        Route("/v2", server_metadata),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, model_metadata),
            Route(f"{prefix}/ready", model_ready),
            Route(f"{prefix}/infer", infer, methods=["POST"]),
        ]

    async def http_error(_request: Request, exc: Exception) -> Response:
        assert isinstance(exc, _HttpError)
        return _error(exc.status, str(exc))

    async def input_error(_request: Request, exc: Exception) -> Response:
        return _error(400, str(exc))

    async def no_model(_request: Request, exc: Exception) -> Response:
        return _error(503, str(exc))

    async def failed(_request: Request, exc: Exception) -> Response:
        return _error(500, str(exc))

    async def not_found(_request: Request, _exc: Exception) -> Response:
        return _error(404, "not found")

    handlers: dict[Any, Any] = {
        _HttpError: http_error,
        InferenceInputError: input_error,
        NoModelError: no_model,
        InferenceFailedError: failed,
        404: not_found,
    }
    return Starlette(routes=routes, exception_handlers=handlers)


class InferenceServer:
    """Runs an app with uvicorn in a background thread on an address of its own (port 0 = ephemeral)."""

    def __init__(self, app: Starlette, *, host: str, port: int, name: str = "agent") -> None:
        self._app = app
        self._host = host
        self._port = port
        self._name = name
        self._server: uvicorn.Server | None = None
        self._thread: threading.Thread | None = None
        self.url: str | None = None

    def start(self, timeout: float = 10.0) -> str:
        """Bind, serve, and return the base URL once the server accepts requests."""
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        # Accepted connections inherit this: without it, a response written as headers + body waits for the
        # client's delayed ACK (Nagle), about 40 ms per request on Linux.
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            sock.bind((self._host, self._port))
        except OSError as exc:
            sock.close()
            raise ConfigError(f"cannot listen on {self._host}:{self._port} (http_host/http_port): {exc}") from exc
        port = sock.getsockname()[1]
        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off")
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(
            target=self._server.run, kwargs={"sockets": [sock]}, name=f"http-{self._name}", daemon=True
        )
        self._thread.start()
        ready = threading.Event()
        for _ in range(int(timeout / 0.02)):
            if self._server.started or not self._thread.is_alive():
                break
            ready.wait(0.02)
        if not self._server.started:
            self.stop()
            raise ConfigError(f"the inference endpoint did not start on {self._host}:{port}")
        host = f"[{self._host}]" if family == socket.AF_INET6 else self._host
        self.url = f"http://{host}:{port}"
        return self.url

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None
        self.url = None
