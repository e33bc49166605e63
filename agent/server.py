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


def create_app(serving: Serving, *, version: str = "0") -> Starlette:
    """The Starlette app of the endpoint for one agent's `serving` (handlers find it in `app.state`)."""
    app = Starlette(routes=_routes(), exception_handlers=_EXCEPTION_HANDLERS)
    app.state.serving = serving
    app.state.version = version
    return app


def _routes() -> list[Route]:
    routes = [
        Route("/v2/health/live", _live),
        Route("/v2/health/ready", _ready),
        Route("/v2", _server_metadata),
    ]
    for prefix in ("/v2/models/{name}", "/v2/models/{name}/versions/{version}"):
        routes += [
            Route(prefix, _model_metadata),
            Route(f"{prefix}/ready", _model_ready),
            Route(f"{prefix}/infer", _infer, methods=["POST"]),
        ]
    return routes


# -- route handlers -----------------------------------------------------------------------------------


def _serving(request: Request) -> Serving:
    serving: Serving = request.app.state.serving
    return serving


def _model_for(request: Request) -> ActiveModel:
    """The served model, if it is the one the path names; 503 before any model, 404 for another one."""
    active = _serving(request).current()
    if active is None:
        raise _HttpError(503, "no model is loaded yet")
    name = request.path_params["name"]
    version = request.path_params.get("version")
    if name != active.spec.name:
        raise _HttpError(404, f"unknown model {name!r}; this device serves {active.spec.name!r}")
    if version is not None and version != active.spec.version:
        raise _HttpError(404, f"model {name!r} has no version {version!r}; serving {active.spec.version!r}")
    return active


async def _live(_request: Request) -> Response:
    return JSONResponse({"live": True})


async def _ready(request: Request) -> Response:
    if _serving(request).current() is None:
        return _error(503, "no model is loaded yet")
    return JSONResponse({"ready": True})


async def _server_metadata(request: Request) -> Response:
    body = ServerMetadata(name="edgefleet-agent", version=request.app.state.version)
    return JSONResponse(body.model_dump(mode="json"))


async def _model_metadata(request: Request) -> Response:
    active = _model_for(request)
    body = ModelMetadata(
        name=active.spec.name,
        versions=[active.spec.version],
        platform=_PLATFORMS.get(active.spec.artifact.format, active.spec.artifact.format.value),
        inputs=active.model.inputs,
        outputs=active.model.outputs,
    )
    return JSONResponse(body.model_dump(mode="json"))


async def _model_ready(request: Request) -> Response:
    active = _model_for(request)
    return JSONResponse({"name": active.spec.name, "ready": True})


async def _infer(request: Request) -> Response:
    active = _model_for(request)
    body = _parse_request(await _json_body(request))
    inputs = {t.name: decode_tensor(t) for t in body.inputs}
    outputs = await run_in_threadpool(_serving(request).infer, inputs, active)
    wanted = _wanted_outputs(body, outputs)
    return _encode_response(active, body, [(name, outputs[name]) for name in wanted])


# -- the steps of an inference request ----------------------------------------------------------------


async def _json_body(request: Request) -> Any:
    try:
        return await request.json()
    except json.JSONDecodeError as exc:
        raise _HttpError(400, f"request body is not JSON: {exc}") from exc


def _parse_request(data: Any) -> InferenceRequest:
    """The inference request in a JSON body; 400 when it is not one, or names an input twice."""
    try:
        body = InferenceRequest.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:5])
        raise _HttpError(400, f"invalid inference request: {problems}") from exc
    names = [t.name for t in body.inputs]
    if len(set(names)) != len(names):
        raise _HttpError(400, f"duplicate input names in {names}")
    return body


def _wanted_outputs(body: InferenceRequest, outputs: dict[str, np.ndarray]) -> list[str]:
    """The outputs the request asks for (all by default), in its order; 400 for a name the model lacks."""
    wanted = [o.name for o in body.outputs] if body.outputs else list(outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise _HttpError(400, f"unknown output(s) {unknown}; the model has {list(outputs)}")
    return wanted


def _encode_response(active: ActiveModel, body: InferenceRequest, outputs: list[tuple[str, np.ndarray]]) -> Response:
    """The JSON inference response; 500 when an output cannot be written as JSON (NaN, Inf)."""
    response = InferenceResponse(
        model_name=active.spec.name,
        model_version=active.spec.version,
        id=body.id,
        outputs=[encode_tensor(name, array) for name, array in outputs],
    )
    try:
        return JSONResponse(response.model_dump(mode="json", exclude_none=True))
    except ValueError as exc:  # NaN/Inf cannot be written as JSON
        raise _HttpError(500, f"model output is not representable as JSON: {exc}") from exc


# -- errors as {"error": ...} bodies ------------------------------------------------------------------


async def _http_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, _HttpError)
    return _error(exc.status, str(exc))


async def _input_error(_request: Request, exc: Exception) -> Response:
    return _error(400, str(exc))


async def _no_model(_request: Request, exc: Exception) -> Response:
    return _error(503, str(exc))


async def _failed(_request: Request, exc: Exception) -> Response:
    return _error(500, str(exc))


async def _not_found(_request: Request, _exc: Exception) -> Response:
    return _error(404, "not found")


_EXCEPTION_HANDLERS: dict[Any, Any] = {
    _HttpError: _http_error,
    InferenceInputError: _input_error,
    NoModelError: _no_model,
    InferenceFailedError: _failed,
    404: _not_found,
}


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
