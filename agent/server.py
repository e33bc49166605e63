"""The local inference endpoint: Open Inference Protocol (KServe v2 REST) on `http_host:http_port`.

Applications written for Triton or KServe talk to it unchanged, with JSON or binary tensor data (the
binary tensor data extension, `agent._oip_codec`). Errors are `{"error": "..."}` with 400 (the request
does not fit the model), 401 (a token is configured and the request lacks it), 404 (unknown model or
version), 413 (the body is over `max_request_bytes`), 503 (no model loaded yet).

With a sample store (`agent.samples`, federated retraining), a model in `sample_rates` answers every
request with an `id` (the request's own, or a new one) and takes labels for kept requests at
`POST /v2/models/{name}/labels` (`{"labels": [{"id": ..., "label": 3}]}` -> `{"stored": n, "unknown": [...]}`).

With `feedback` (`agent.feedback`; an agent always has it), requests with an `id` are remembered, and
`POST /v2/models/{name}/feedback` (also under `/versions/{version}`) takes labels for them, counted in telemetry:
`{"id": ..., "label": 3}`, `{"id": ..., "labels": [3, 7]}` (one per row) or a list of those -> 200
`{"labelled": n, "correct": k, "abs_error_sum": e, "stale": [...], "items": [...]}`; 400 a body that is not JSON or
not that shape, 404 an id the agent does not remember, 409 an id already labelled, 422 a label of the wrong kind or
count. Labels of sampled models are also stored in the sample store.

With `metrics` (`agent.metrics`, config `metrics = true`, the default), `GET /metrics` answers Prometheus.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import logging
import socket
import threading
import uuid
from typing import TYPE_CHECKING, Any

import numpy as np
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from agent._http_guards import BodyLimit, TokenAuth
from agent._oip_codec import (
    DecodedRequest,
    EncodedResponse,
    decode_tensor,
    encode_response,
    encode_tensor,
    read_request,
)
from agent.config import AgentConfig
from agent.errors import (
    AlreadyLabelledError,
    ConfigError,
    FeedbackBodyError,
    FeedbackError,
    InferenceFailedError,
    InferenceInputError,
    LabelMismatchError,
    NoModelError,
    UnknownRequestError,
)
from agent.feedback import Feedback, FeedbackItem, parse_feedback
from agent.metrics import AgentMetrics
from agent.serving import ActiveModel, Serving
from protocol import ModelFormat
from protocol.inference import (
    BINARY_TENSOR_DATA,
    INFERENCE_HEADER_CONTENT_LENGTH,
    InferenceRequest,
    ModelMetadata,
    ServerMetadata,
)

if TYPE_CHECKING:
    import uvicorn

    from agent.samples import LabelEntry, SampleStore

__all__ = ["DEFAULT_MAX_REQUEST_BYTES", "InferenceServer", "create_app", "decode_tensor", "encode_tensor"]

log = logging.getLogger(__name__)

# One default for the setting and for apps built without a config (simulators, tests).
DEFAULT_MAX_REQUEST_BYTES: int = AgentConfig.model_fields["http_max_request_bytes"].default

_PLATFORMS = {ModelFormat.ONNX: "onnxruntime_onnx", ModelFormat.TFLITE: "tensorflow_lite"}
# Probes of liveness and readiness stay open when a token is set: orchestrators call them without one.
_HEALTH_PATHS = ("/v2/health/live", "/v2/health/ready")


class _HttpError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def create_app(
    serving: Serving,
    *,
    version: str = "0",
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES,
    token: str | None = None,
    samples: SampleStore | None = None,
    metrics: AgentMetrics | None = None,
    feedback: Feedback | None = None,
) -> Starlette:
    """The Starlette app of the endpoint for one agent's `serving` (handlers find it in `app.state`).

    Bodies over `max_request_bytes` get 413 unread; with a `token`, every route but health needs it.
    With `samples`, served requests of opted-in models are offered to the store, and labels are taken.
    With `metrics`, `GET /metrics` answers a Prometheus scrape (behind the token like every other route).
    With `feedback`, requests with an id are remembered and `POST .../feedback` takes labels for them.
    """
    if max_request_bytes < 1:
        raise ConfigError(f"max_request_bytes (http_max_request_bytes) must be positive, got {max_request_bytes}")
    if token is not None and not token.strip():
        raise ConfigError("the endpoint token (http_token) is empty; set a long random one, or none")
    middleware = [Middleware(TokenAuth, token=token, open_paths=_HEALTH_PATHS)] if token is not None else []
    middleware.append(Middleware(BodyLimit, max_bytes=max_request_bytes))  # inside auth: strangers are refused first
    routes = _routes(feedback=feedback is not None)
    if metrics is not None:
        routes.append(Route("/metrics", _metrics))
    handlers = dict(_EXCEPTION_HANDLERS)
    if samples is not None:  # `agent.samples` is loaded by then (the caller made the store), and only then
        from agent.samples import LabelsError

        handlers[LabelsError] = _input_error
    app = Starlette(routes=routes, middleware=middleware, exception_handlers=handlers)
    app.state.serving = serving
    app.state.samples = samples
    app.state.metrics = metrics
    app.state.feedback = feedback
    app.state.version = version
    app.state.token_required = token is not None
    return app


def _routes(*, feedback: bool) -> list[Route]:
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
        if feedback:
            routes.append(Route(f"{prefix}/feedback", _feedback, methods=["POST"]))
    routes.append(Route("/v2/models/{name}/labels", _labels, methods=["POST"]))
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
    body = ServerMetadata(name="edgefleet-agent", version=request.app.state.version, extensions=[BINARY_TENSOR_DATA])
    return JSONResponse(body.model_dump(mode="json"))


async def _metrics(request: Request) -> Response:
    metrics: AgentMetrics = request.app.state.metrics
    body, content_type = await run_in_threadpool(metrics.exposition, request.headers.get("accept"))
    return Response(body, media_type=content_type)


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
    raw = await request.body()  # at most max_request_bytes: BodyLimit refuses more
    # Parsing, inference and encoding run in one worker thread (a large body must not hold up the health probes),
    # one hand-off per request: each hop to the thread pool and back costs more than a small model's inference.
    encoded = await run_in_threadpool(
        _serve,
        raw,
        request.headers.get(INFERENCE_HEADER_CONTENT_LENGTH),
        _serving(request),
        _samples(request),
        request.app.state.feedback,
        active,
    )
    return Response(encoded.content, media_type=encoded.media_type, headers=encoded.headers)


def _serve(
    raw: bytes,
    header_length: str | None,
    serving: Serving,
    samples: SampleStore | None,
    feedback: Feedback | None,
    active: ActiveModel,
) -> EncodedResponse:
    """Decode a request, run it (`_infer_and_sample`) and encode the response (on a worker thread)."""
    decoded = read_request(raw, header_length)
    if samples is not None and samples.opted_in(active.spec.name):
        decoded = _with_id(decoded)  # the id a client labels this request by
    outputs = _infer_and_sample(serving, samples, feedback, decoded, active)
    wanted = _wanted_outputs(decoded.body, outputs)
    return encode_response(
        decoded,
        [(name, outputs[name]) for name in wanted],
        model_name=active.spec.name,
        model_version=active.spec.version,
    )


def _samples(request: Request) -> SampleStore | None:
    samples: SampleStore | None = request.app.state.samples
    return samples


def _with_id(decoded: DecodedRequest) -> DecodedRequest:
    """The request with an id: its own (echoed, as the protocol says), else a new one (returned in the response)."""
    if decoded.body.id:
        return decoded
    body = decoded.body.model_copy(update={"id": uuid.uuid4().hex})
    return dataclasses.replace(decoded, body=body)


def _infer_and_sample(
    serving: Serving,
    samples: SampleStore | None,
    feedback: Feedback | None,
    decoded: DecodedRequest,
    active: ActiveModel,
) -> dict[str, np.ndarray]:
    """Run the inference; remember the prediction of a request with an id (to take its label later); offer a served
    request of an opted-in model to the store (neither ever raises)."""
    outputs = serving.infer(decoded.inputs, active)
    if feedback is not None and decoded.body.id:
        feedback.remember(decoded.body.id, active, outputs)
    if samples is not None and decoded.body.id and samples.opted_in(active.spec.name):
        samples.offer(decoded.body.id, active.spec.name, active.spec.version, decoded.inputs)
    return outputs


async def _labels(request: Request) -> Response:
    name = request.path_params["name"]
    samples = _samples(request)
    if samples is None or not samples.opted_in(name):
        raise _HttpError(404, f"sampling is not enabled for model {name!r} on this device: set sample_rates")
    from agent.samples import SampleStoreError

    raw = await request.body()  # at most max_request_bytes: BodyLimit refuses more
    entries = await run_in_threadpool(_read_labels, raw)
    try:
        result = await run_in_threadpool(samples.label, name, entries)
    except SampleStoreError as exc:
        raise _HttpError(503, f"the sample store cannot take labels now: {exc}") from exc
    return JSONResponse({"stored": result.stored, "unknown": result.unknown})


async def _feedback(request: Request) -> Response:
    feedback: Feedback = request.app.state.feedback
    name = request.path_params["name"]
    raw = await request.body()  # at most max_request_bytes: BodyLimit refuses more
    try:
        items = await run_in_threadpool(_read_feedback, raw)
    except FeedbackError as exc:
        for _, _, reason, _ in exc.refused or [(0, "", "malformed", "")]:
            feedback.observed(name, reason, 1)
        raise
    result = await run_in_threadpool(feedback.label, name, items, version=request.path_params.get("version"))
    return JSONResponse(result.to_json())


def _json_body(raw: bytes, error: type[Exception]) -> Any:
    """A request body's JSON; `error` (the route's 400) saying why it is not usable."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise error("the body is not usable JSON: it is nested too deeply") from None
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise error(f"the body is not JSON: {exc}") from exc


def _read_feedback(raw: bytes) -> list[FeedbackItem]:
    """The items of a feedback body; `FeedbackBodyError` (400) or `LabelMismatchError` (422) saying what is wrong."""
    return parse_feedback(_json_body(raw, FeedbackBodyError))


def _read_labels(raw: bytes) -> list[LabelEntry]:
    """The entries of a labels body; `LabelsError` (400) saying what is wrong with it."""
    from agent.samples import LabelsError, parse_labels

    return parse_labels(_json_body(raw, LabelsError))


def _wanted_outputs(body: InferenceRequest, outputs: dict[str, np.ndarray]) -> list[str]:
    """The outputs the request asks for (all by default), in its order; 400 for a name the model lacks."""
    wanted = [o.name for o in body.outputs] if body.outputs else list(outputs)
    unknown = [name for name in wanted if name not in outputs]
    if unknown:
        raise _HttpError(400, f"unknown output(s) {unknown}; the model has {list(outputs)}")
    return wanted


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


# Who is at fault for a refused label, as an HTTP status (a body with several refused items: the first one's).
_FEEDBACK_STATUS: dict[type[FeedbackError], int] = {
    UnknownRequestError: 404,
    AlreadyLabelledError: 409,
    LabelMismatchError: 422,
}


async def _feedback_error(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, FeedbackError)
    refused = [{"index": i, "id": rid, "reason": reason, "error": msg} for i, rid, reason, msg in exc.refused]
    body: dict[str, Any] = {"error": str(exc)}
    if refused:
        body["refused"] = refused
    return JSONResponse(body, status_code=_FEEDBACK_STATUS.get(type(exc), 400))


async def _not_found(_request: Request, _exc: Exception) -> Response:
    return _error(404, "not found")


_EXCEPTION_HANDLERS: dict[Any, Any] = {
    _HttpError: _http_error,
    InferenceInputError: _input_error,
    FeedbackError: _feedback_error,
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
        self._warn_if_open(port)
        import uvicorn  # with the endpoint: an agent without one never loads it

        # ws="none": the endpoint speaks HTTP only, so uvicorn does not load a WebSocket library (~1.5 MiB resident).
        config = uvicorn.Config(self._app, log_level="warning", access_log=False, lifespan="off", ws="none")
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

    def _warn_if_open(self, port: int) -> None:
        """Warn when the endpoint is reachable from other machines and anyone there may use it."""
        if not _is_loopback(self._host) and not getattr(self._app.state, "token_required", False):
            log.warning(
                "the inference endpoint listens on %s:%s, beyond this machine, without a token: "
                "anyone who can reach it can run the model (set http_token)",
                self._host,
                port,
            )

    def stop(self, timeout: float = 5.0) -> None:
        """Ask uvicorn to exit and wait for its thread."""
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout)
        self._server = self._thread = None
        self.url = None


def _is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (127.0.0.0/8, ::1, localhost)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:  # a host name: it may resolve to anything
        return False
