"""The fault injectors themselves: the faulty artifact server over real HTTP, and the faulty models in ONNX Runtime."""

from __future__ import annotations

import hashlib
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import onnxruntime
import pytest

from simulators.faults import ArtifactFaults, FaultyArtifactServer, nan_model, nan_on_live_input_model, slow_model

DATA = bytes(range(256)) * 40  # 10 KiB
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def server() -> Iterator[FaultyArtifactServer]:
    with FaultyArtifactServer() as srv:
        yield srv


def test_serves_whole_files_and_byte_ranges(server: FaultyArtifactServer) -> None:
    url = server.publish("a.bin", DATA)
    assert httpx.get(url).content == DATA
    partial = httpx.get(url, headers={"Range": "bytes=1000-"})
    assert partial.status_code == 206 and partial.content == DATA[1000:]
    assert partial.headers["content-range"] == f"bytes 1000-{len(DATA) - 1}/{len(DATA)}"
    assert httpx.get(url, headers={"Range": f"bytes={len(DATA)}-"}).status_code == 416
    assert httpx.get(f"{server.url}/missing").status_code == 404
    assert server.served_bytes("a.bin") == len(DATA) + len(DATA) - 1000


def test_drops_the_connection_once_after_n_bytes(server: FaultyArtifactServer) -> None:
    url = server.publish("a.bin", DATA, ArtifactFaults(drop_after=3000, chunk_bytes=1000))
    with pytest.raises(httpx.RemoteProtocolError):
        httpx.get(url)
    assert httpx.get(url).content == DATA  # only once
    # The server records a request once its handler returns, which may be just after the client has the body.
    deadline = time.monotonic() + 5
    while len(server.requests("a.bin")) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert [r.sent for r in server.requests("a.bin")] == [3000, len(DATA)]


def test_truncates_corrupts_and_ignores_range(server: FaultyArtifactServer) -> None:
    truncated = server.publish("t.bin", DATA, ArtifactFaults(truncate_to=100))
    assert httpx.get(truncated).content == DATA[:100]
    corrupt = server.publish("c.bin", DATA, ArtifactFaults(corrupt_at=5))
    body = httpx.get(corrupt).content
    assert body[5] == DATA[5] ^ 0xFF and body[:5] + body[6:] == DATA[:5] + DATA[6:]
    assert httpx.get(corrupt).content == DATA  # corrupt_times=1
    stubborn = server.publish("r.bin", DATA, ArtifactFaults(ignore_range=True))
    whole = httpx.get(stubborn, headers={"Range": "bytes=10-"})
    assert whole.status_code == 200 and whole.content == DATA


def test_serves_slowly(server: FaultyArtifactServer) -> None:
    url = server.publish("s.bin", DATA, ArtifactFaults(delay_s=0.02, chunk_bytes=1024))
    start = time.monotonic()
    body = httpx.get(url).content
    # ten chunks with a pause after each: the client has the whole body once the tenth chunk is sent, before the
    # server's last pause, so only nine pauses are certain to fall inside the request
    assert time.monotonic() - start >= 9 * 0.02
    assert hashlib.sha256(body).digest() == hashlib.sha256(DATA).digest()


def run(model: bytes, x: np.ndarray) -> np.ndarray:
    return onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]


def test_faulty_models_keep_the_tensors_and_fail_as_advertised(digits_model_bytes: bytes) -> None:
    x = np.linspace(0, 1, 128, dtype=np.float32).reshape(2, 64)
    zeros = np.zeros((1, 64), np.float32)
    original = run(digits_model_bytes, x)
    assert np.isnan(run(nan_model(digits_model_bytes), zeros)).all()
    live = nan_on_live_input_model(digits_model_bytes)
    np.testing.assert_array_equal(run(live, zeros), run(digits_model_bytes, zeros))
    assert np.isnan(run(live, x)).all()
    np.testing.assert_array_equal(run(slow_model(digits_model_bytes, size=64, repeats=1), x), original)


def test_faulty_agent_refuses_an_unreadable_configuration(tmp_path: Path) -> None:
    bad = tmp_path / "agent.toml"
    bad.write_text('device_id = "x"\n')  # no data_dir, no broker
    command = [sys.executable, "-m", "simulators.faulty_agent", "--config", str(bad), "--kill-at", "switching"]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert done.returncode == 2 and "data_dir" in done.stderr
