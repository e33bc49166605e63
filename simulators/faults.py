"""Faults to throw at real agents: a misbehaving artifact server and models that fail in chosen ways.

Artifact faults (`FaultyArtifactServer`, plain HTTP on 127.0.0.1, HTTP Range supported like the
coordinator's store)::

    with FaultyArtifactServer(tmp_path) as server:
        url = server.publish("digits-2.onnx", data, ArtifactFaults(drop_after=4096))  # cut once, mid-body
        ...
        assert server.served_bytes("digits-2.onnx") < 2 * len(data)  # the agent resumed with Range

Model faults, built on `compression.reference`'s digits classifier (input `input` FP32 [batch, 64],
output `probabilities` FP32 [batch, 10]); each keeps the tensors, so only the health check can tell:

- `nan_model` answers NaN for every input (fails the warm-up health check);
- `nan_on_live_input_model` is healthy on the warm-up's zeros but answers NaN on real (positive) pixels,
  so it passes the warm-up and fails on live traffic (the shadow run or the trial after the switch);
- `slow_model` answers the same as the original, many times slower (input-dependent heavy MatMuls);
- `shifted_model` answers a rotated class (`compression.reference.shifted_model`): plausible but wrong,
  which only a shadow run against the serving model notices.
"""

from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import helper, numpy_helper

from compression.reference import OUTPUT_NAME, shifted_model

__all__ = [
    "ArtifactFaults",
    "FaultyArtifactServer",
    "ServedRequest",
    "nan_model",
    "nan_on_live_input_model",
    "shifted_model",
    "slow_model",
]

_RANGE = re.compile(r"^bytes=(\d+)-(\d*)$")


@dataclass
class ArtifactFaults:
    """How one published file misbehaves. Counters (`*_times`) say how many responses are affected."""

    truncate_to: int | None = None  # serve a truncated file: only the first N bytes, cleanly (short Content-Length)
    drop_after: int | None = None  # cut the connection after N body bytes of a response (Content-Length says all)
    drop_times: int = 1
    corrupt_at: int | None = None  # flip the byte at this file offset
    corrupt_times: int = 1  # -1 = every response
    delay_s: float = 0.0  # sleep between chunks of `chunk_bytes`: a slow server
    chunk_bytes: int = 4096
    ignore_range: bool = False  # answer every Range request with the whole file (200)
    endless: bool = False  # no Content-Length: the file, then filler until the client hangs up (capped at 1 GiB)


@dataclass(frozen=True)
class ServedRequest:
    """One request the server answered: path, the Range header, status and body bytes actually sent."""

    path: str
    range: str | None
    status: int
    sent: int


@dataclass
class _File:
    data: bytes
    faults: ArtifactFaults
    requests: list[ServedRequest] = field(default_factory=list)


class FaultyArtifactServer:
    """An HTTP artifact server on 127.0.0.1 that can truncate, corrupt, drop and slow down its files."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root
        self._files: dict[str, _File] = {}
        self._lock = threading.Lock()
        server = self

        class Handler(_FaultyHandler):
            owner = server

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="faulty-artifacts", daemon=True)

    def __enter__(self) -> FaultyArtifactServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def publish(self, name: str, data: bytes, faults: ArtifactFaults | None = None) -> str:
        """Serve `data` at `/name` with `faults` (none by default); returns its URL."""
        with self._lock:
            self._files[name] = _File(data=data, faults=faults or ArtifactFaults())
        if self.root is not None:
            (self.root / name).write_bytes(data)
        return f"{self.url}/{name}"

    def set_faults(self, name: str, faults: ArtifactFaults) -> None:
        """Change how `name` misbehaves from the next request on."""
        with self._lock:
            self._files[name].faults = faults

    def requests(self, name: str) -> list[ServedRequest]:
        """Every request answered for `name`, in order."""
        with self._lock:
            return list(self._files[name].requests)

    def served_bytes(self, name: str) -> int:
        """Body bytes sent for `name` over all requests (to prove a download resumed instead of restarting)."""
        return sum(r.sent for r in self.requests(name))

    # -- used by the handler ------------------------------------------------------------------------

    def _take(self, name: str) -> tuple[bytes, ArtifactFaults, bool, bool] | None:
        """The file, its faults, and whether this response is dropped / corrupted (consuming the budgets)."""
        with self._lock:
            entry = self._files.get(name)
            if entry is None:
                return None
            faults = entry.faults
            drop = faults.drop_after is not None and faults.drop_times != 0
            if drop and faults.drop_times > 0:
                faults.drop_times -= 1
            corrupt = faults.corrupt_at is not None and faults.corrupt_times != 0
            if corrupt and faults.corrupt_times > 0:
                faults.corrupt_times -= 1
            return entry.data, faults, drop, corrupt

    def _record(self, name: str, request: ServedRequest) -> None:
        with self._lock:
            if name in self._files:
                self._files[name].requests.append(request)


class _FaultyHandler(BaseHTTPRequestHandler):
    owner: FaultyArtifactServer

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        name = self.path.lstrip("/").split("?", 1)[0]
        taken = self.owner._take(name)
        range_header = self.headers.get("Range")
        if taken is None:
            self._answer_empty(404)
            self.owner._record(name, ServedRequest(name, range_header, 404, 0))
            return
        data, faults, drop, corrupt = taken
        if faults.endless:
            self._answer_endless(name, range_header, data, faults)
            return
        if faults.truncate_to is not None:
            data = data[: faults.truncate_to]
        if corrupt and faults.corrupt_at is not None and faults.corrupt_at < len(data):
            at = faults.corrupt_at
            data = data[:at] + bytes([data[at] ^ 0xFF]) + data[at + 1 :]
        status, start, end = 200, 0, len(data)
        match = _RANGE.match(range_header or "")
        if match and not faults.ignore_range:
            start = int(match.group(1))
            end = min(int(match.group(2)) + 1, len(data)) if match.group(2) else len(data)
            if start >= len(data):
                self._answer_empty(416, {"Content-Range": f"bytes */{len(data)}"})
                self.owner._record(name, ServedRequest(name, range_header, 416, 0))
                return
            status = 206
        body = data[start:end]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(data)}")
        self.end_headers()
        limit = faults.drop_after if drop and faults.drop_after is not None else len(body)
        sent = 0
        try:
            while sent < min(limit, len(body)):
                piece = body[sent : min(sent + faults.chunk_bytes, limit)]
                self.wfile.write(piece)
                self.wfile.flush()
                sent += len(piece)
                if faults.delay_s:
                    time.sleep(faults.delay_s)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away (e.g. a killed agent); what was sent is counted
        finally:
            self.owner._record(name, ServedRequest(name, range_header, status, sent))
        if sent < len(body):
            self.close_connection = True  # the drop: the declared length is never reached

    def _answer_endless(self, name: str, range_header: str | None, data: bytes, faults: ArtifactFaults) -> None:
        """The endless-data attack: a body without a length that never ends (until 1 GiB, so the loop stops)."""
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.end_headers()
        self.close_connection = True
        sent = 0
        filler = bytes(faults.chunk_bytes)
        try:
            self.wfile.write(data)
            sent = len(data)
            while sent < 1 << 30:
                self.wfile.write(filler)
                sent += len(filler)
        except (BrokenPipeError, ConnectionResetError):
            pass
        finally:
            self.owner._record(name, ServedRequest(name, range_header, 200, sent))

    def _answer_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", "0")
        self.end_headers()


# -- model faults ---------------------------------------------------------------------------------------------


def _rewire_output(model_bytes: bytes) -> tuple[onnx.ModelProto, str]:
    """The model with its output renamed internally, so new nodes can compute the public output from it."""
    model = onnx.load_from_string(model_bytes)
    inner = f"{OUTPUT_NAME}_original"
    for node in model.graph.node:
        node.output[:] = [inner if name == OUTPUT_NAME else name for name in node.output]
    return model, inner


def _finish(model: onnx.ModelProto) -> bytes:
    onnx.checker.check_model(model)
    return model.SerializeToString()


def nan_model(model_bytes: bytes) -> bytes:
    """The classifier with every output multiplied by NaN: loads fine, fails the health check."""
    model, inner = _rewire_output(model_bytes)
    model.graph.initializer.append(numpy_helper.from_array(np.array([np.nan], dtype=np.float32), "fault_nan"))
    model.graph.node.append(helper.make_node("Mul", [inner, "fault_nan"], [OUTPUT_NAME]))
    return _finish(model)


def nan_on_live_input_model(model_bytes: bytes) -> bytes:
    """The classifier plus `0 * sum(sqrt(-input))`: exact on all-zero input, NaN once any pixel is positive."""
    model, inner = _rewire_output(model_bytes)
    model.graph.initializer.append(numpy_helper.from_array(np.array([0.0], dtype=np.float32), "fault_zero"))
    model.graph.node.extend(
        [
            helper.make_node("Neg", [model.graph.input[0].name], ["fault_negated"]),
            helper.make_node("Sqrt", ["fault_negated"], ["fault_root"]),
            helper.make_node("ReduceSum", ["fault_root"], ["fault_sum"], keepdims=0),
            helper.make_node("Mul", ["fault_sum", "fault_zero"], ["fault_nothing"]),
            helper.make_node("Add", [inner, "fault_nothing"], [OUTPUT_NAME]),
        ]
    )
    return _finish(model)


def slow_model(model_bytes: bytes, *, size: int = 512, repeats: int = 4) -> bytes:
    """The classifier plus `repeats` input-dependent `size`x`size` MatMuls whose result is added times zero.

    The answers are the original's exactly; each inference costs about `repeats * 2 * size**3` extra FLOPs
    (about 2 GFLOPs by default: milliseconds instead of the original's tens of microseconds). The work depends
    on the input, so ONNX Runtime cannot fold it away, and `Tanh` keeps it finite.
    """
    model, inner = _rewire_output(model_bytes)
    graph = model.graph
    features = graph.input[0].type.tensor_type.shape.dim[-1].dim_value or 64
    tiles = -(-size // features)  # ceil: enough copies of the input row to reach `size` columns
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1, tiles], dtype=np.int64), "fault_tiles"),
            numpy_helper.from_array(np.array([0], dtype=np.int64), "fault_start"),
            numpy_helper.from_array(np.array([size], dtype=np.int64), "fault_end"),
            numpy_helper.from_array(np.array([1], dtype=np.int64), "fault_axis"),
            numpy_helper.from_array(np.array([0.0], dtype=np.float32), "fault_zero"),
        ]
    )
    nodes = [
        helper.make_node("Tile", [graph.input[0].name, "fault_tiles"], ["fault_tiled"]),
        helper.make_node("Slice", ["fault_tiled", "fault_start", "fault_end", "fault_axis"], ["fault_row"]),
        helper.make_node("Transpose", ["fault_row"], ["fault_column"], perm=[1, 0]),
        helper.make_node("MatMul", ["fault_column", "fault_row"], ["fault_m0"]),  # [size, size] from the input
    ]
    current = "fault_m0"
    for index in range(repeats):
        nodes.append(helper.make_node("MatMul", [current, current], [f"fault_p{index}"]))
        nodes.append(helper.make_node("Tanh", [f"fault_p{index}"], [f"fault_m{index + 1}"]))
        current = f"fault_m{index + 1}"
    nodes += [
        helper.make_node("ReduceSum", [current], ["fault_sum"], keepdims=0),
        helper.make_node("Mul", ["fault_sum", "fault_zero"], ["fault_nothing"]),
        helper.make_node("Add", [inner, "fault_nothing"], [OUTPUT_NAME]),
    ]
    graph.node.extend(nodes)
    del graph.value_info[:]  # shapes of the rewired graph are inferred again by the runtime
    return _finish(model)
