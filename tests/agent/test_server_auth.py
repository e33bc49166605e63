"""The endpoint's bearer token, over real uvicorn: who gets in, who gets a 401, and the warning without one."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator

import httpx
import pytest

from agent.errors import ConfigError
from agent.server import InferenceServer, _is_loopback, create_app
from agent.serving import Serving
from tests.agent.test_server import ROWS, body, digits_serving, endpoint
from tests.agent.test_server_limits import INFER, connect, read_response

TOKEN = "3f9c1d2e-edge-token-for-tests"


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory, digits_model_bytes: bytes) -> Iterator[str]:
    serving = digits_serving(tmp_path_factory.mktemp("auth"), digits_model_bytes)
    with endpoint(serving, token=TOKEN) as base:
        yield base


PROTECTED = [
    ("GET", "/v2"),
    ("GET", "/v2/models/digits"),
    ("GET", "/v2/models/digits/ready"),
    ("GET", "/v2/models/digits/versions/1.0"),
    ("POST", "/v2/models/digits/infer"),
    ("GET", "/v2/models/cats"),  # even a 404 is not told to a stranger
]


@pytest.mark.parametrize(("method", "path"), PROTECTED)
@pytest.mark.parametrize(
    "authorization",
    [None, "Bearer wrong-token-of-the-same-size", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer"],
    ids=["missing", "wrong", "other_scheme", "longer", "scheme_only"],
)
def test_token_required_when_configured(url: str, method: str, path: str, authorization: str | None) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    response = httpx.request(method, f"{url}{path}", json=body(ROWS), headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert "http_token" in response.json()["error"]


@pytest.mark.parametrize("scheme", ["Bearer", "bearer"])
def test_the_right_token_opens_every_route(url: str, scheme: str) -> None:
    with httpx.Client(base_url=url, headers={"Authorization": f"{scheme} {TOKEN}"}) as client:
        assert client.get("/v2").json()["name"] == "edgefleet-agent"
        assert client.get("/v2/models/digits/ready").status_code == 200
        answer = client.post("/v2/models/digits/infer", json=body(ROWS))
        assert answer.status_code == 200 and answer.json()["outputs"][0]["shape"] == [3, 10]
        assert client.get("/v2/models/cats").status_code == 404


def test_health_probes_need_no_token(url: str) -> None:
    assert httpx.get(f"{url}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{url}/v2/health/ready").json() == {"ready": True}


def test_stranger_is_refused_before_the_body_is_read(url: str) -> None:
    with connect(url) as sock:
        start = time.monotonic()
        sock.sendall(INFER + b"Content-Length: 209715200\r\n\r\n")
        status, headers, _ = read_response(sock)
        assert status == 401 and time.monotonic() - start < 1.0
        assert headers["connection"] == "close" and sock.recv(1) == b""


def test_an_empty_token_is_refused_at_startup() -> None:
    with pytest.raises(ConfigError, match="http_token"):
        create_app(Serving(), token="  ")


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        *[("127.0.0.1", True), ("127.0.0.2", True), ("::1", True), ("localhost", True), ("[::1]", True)],
        *[("0.0.0.0", False), ("::", False), ("192.168.1.20", False), ("edge.local", False)],
    ],
)
def test_loopback_hosts_are_told_apart(host: str, loopback: bool) -> None:
    assert _is_loopback(host) is loopback


@pytest.mark.parametrize(
    ("host", "token", "warned"),
    [("0.0.0.0", None, True), ("0.0.0.0", TOKEN, False), ("127.0.0.1", None, False)],
    ids=["all_interfaces_without_token", "all_interfaces_with_token", "loopback_without_token"],
)
def test_endpoint_beyond_loopback_without_a_token_warns(
    caplog: pytest.LogCaptureFixture, host: str, token: str | None, warned: bool
) -> None:
    server = InferenceServer(create_app(Serving(), token=token), host=host, port=0)  # no model: nothing to run
    with caplog.at_level(logging.WARNING, logger="agent.server"):
        url = server.start()
    try:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
    finally:
        server.stop()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("without a token" in w and "http_token" in w for w in warnings) is warned
