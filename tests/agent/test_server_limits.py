"""Attacks on the endpoint's body handling, over real uvicorn: oversized, endless and malformed bodies."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import pytest

from agent.config import AgentConfig, load_config
from agent.errors import ConfigError
from agent.server import DEFAULT_MAX_REQUEST_BYTES
from agent.serving import Serving
from tests.agent.test_server import ROWS, body, digits_serving, endpoint

LIMIT = 1024 * 1024
INFER = b"POST /v2/models/digits/infer HTTP/1.1\r\nHost: edge\r\nContent-Type: application/json\r\n"


@pytest.fixture(scope="module")
def serving(tmp_path_factory: pytest.TempPathFactory, digits_model_bytes: bytes) -> Serving:
    return digits_serving(tmp_path_factory.mktemp("limits"), digits_model_bytes)


@pytest.fixture(scope="module")
def url(serving: Serving) -> Iterator[str]:
    """The digits endpoint with a 1 MiB body limit."""
    with endpoint(serving, max_request_bytes=LIMIT) as base:
        yield base


def connect(url: str) -> socket.socket:
    parts = urlsplit(url)
    return socket.create_connection((parts.hostname or "127.0.0.1", parts.port or 80), timeout=10)


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 response with a Content-Length."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        assert chunk, f"connection closed before a response; got {data!r}"
        data += chunk
    head, _, rest = data.partition(b"\r\n\r\n")
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines)}
    while len(rest) < int(headers["content-length"]):
        rest += sock.recv(65536)
    return int(status_line.split()[1]), headers, rest


def padded(size: int) -> bytes:
    """A valid digits request of exactly `size` bytes (trailing JSON whitespace)."""
    raw = json.dumps(body(ROWS)).encode()
    assert len(raw) <= size
    return raw + b" " * (size - len(raw))


def test_oversized_body_is_refused_with_413_before_it_is_read(url: str) -> None:
    with connect(url) as sock:
        sock.sendall(INFER + b"Content-Length: 209715200\r\n\r\n")  # 200 MiB announced, not one byte sent
        start = time.monotonic()
        status, headers, content = read_response(sock)
        elapsed = time.monotonic() - start
        assert status == 413 and elapsed < 1.0
        assert "limit of 1048576 bytes" in json.loads(content)["error"]
        assert headers["connection"] == "close"
        assert sock.recv(1) == b""  # the server hung up instead of waiting for the body


def test_chunked_body_over_the_limit_is_cut_off(url: str) -> None:
    with connect(url) as sock:
        sock.sendall(INFER + b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"[" * 65536
        for _ in range(LIMIT // len(piece)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        sock.sendall(b"1\r\n[\r\n")  # one byte over, and the body never ends
        status, headers, content = read_response(sock)
        assert status == 413 and "over this endpoint's limit" in json.loads(content)["error"]
        assert headers["connection"] == "close"
        with pytest.raises(OSError):  # nothing reads the rest: the connection is gone
            for _ in range(1024):
                sock.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))


@pytest.mark.parametrize("chunked", [False, True], ids=["content_length", "chunked"])
def test_body_of_exactly_the_limit_is_served(url: str, chunked: bool) -> None:
    content = padded(LIMIT)
    stream = iter([content[: LIMIT // 2], content[LIMIT // 2 :]])  # a generator: httpx sends it chunked
    response = httpx.post(f"{url}/v2/models/digits/infer", content=stream if chunked else content, timeout=10)
    assert response.status_code == 200, response.text
    assert response.json()["outputs"][0]["shape"] == [3, 10]


def test_httpx_client_sending_a_large_body_gets_the_413(url: str) -> None:
    response = httpx.post(f"{url}/v2/models/digits/infer", content=padded(LIMIT + 1), timeout=10)
    assert response.status_code == 413 and "error" in response.json()


def test_health_stays_ready_while_oversized_bodies_are_refused(url: str) -> None:
    refusals: list[float] = []
    stop = threading.Event()

    def attack() -> None:
        while not stop.is_set():
            with connect(url) as sock:
                start = time.monotonic()
                sock.sendall(INFER + b"Content-Length: 209715200\r\n\r\n" + b"[" * 65536)
                assert read_response(sock)[0] == 413
                refusals.append(time.monotonic() - start)

    attacker = threading.Thread(target=attack, daemon=True)
    attacker.start()
    probes: list[float] = []
    with httpx.Client(base_url=url, timeout=5) as client:
        for _ in range(50):
            start = time.monotonic()
            assert client.get("/v2/health/ready").status_code == 200
            probes.append(time.monotonic() - start)
    stop.set()
    attacker.join(10)
    assert len(refusals) >= 5 and max(refusals) < 1.0
    assert max(probes) < 1.0


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        (b'{"inputs": [{"name": "input\xff"}]}', "not UTF-8"),
        ('{"inputs": []}'.encode("utf-16"), "not UTF-8"),
        (b"\x89PNG\r\n\x1a\n" + bytes(range(256)), "not UTF-8"),
        (b"[" * 200_000, "nested too deeply"),
        (b'{"inputs": [{"name": "input", "shape": [1], "datatype": "INT64", "data": [' + b"9" * 5000 + b"]}]}", "JSON"),
    ],
    ids=["latin1_byte", "utf16", "binary_garbage", "deep_nesting", "huge_integer"],
)
def test_non_utf8_body_is_a_400(url: str, content: bytes, fragment: str) -> None:
    response = httpx.post(f"{url}/v2/models/digits/infer", content=content, timeout=10)
    assert response.status_code == 400, response.text
    assert fragment in response.json()["error"]
    assert httpx.get(f"{url}/v2/health/ready").status_code == 200


def test_limit_and_token_come_from_the_environment(tmp_path: Path) -> None:
    base = {"EDGEFLEET_AGENT_DEVICE_ID": "edge-1", "EDGEFLEET_AGENT_DATA_DIR": str(tmp_path)}
    base["EDGEFLEET_AGENT_MQTT_URL"] = "mqtt://127.0.0.1:1883"
    default = load_config(None, env=base)
    assert default.http_max_request_bytes == DEFAULT_MAX_REQUEST_BYTES == 32 * 1024 * 1024
    assert default.http_token is None
    env = {**base, "EDGEFLEET_AGENT_HTTP_MAX_REQUEST_BYTES": "1048576", "EDGEFLEET_AGENT_HTTP_TOKEN": "s" * 32}
    config = load_config(None, env=env)
    assert config.http_max_request_bytes == 1048576 and config.http_token == "s" * 32
    with pytest.raises(ConfigError, match="http_token"):
        load_config(None, env={**base, "EDGEFLEET_AGENT_HTTP_TOKEN": "secret"})  # too short to be a secret
    with pytest.raises(ConfigError, match="http_max_request_bytes"):
        load_config(None, env={**base, "EDGEFLEET_AGENT_HTTP_MAX_REQUEST_BYTES": "0"})
    assert "loopback" in (AgentConfig.model_fields["http_token"].description or "")
