"""Artifact downloads through a redirect (a coordinator sending devices to a CDN): followed safely, resumed."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from agent.errors import DownloadError
from agent.update.fetch import ArtifactFetcher, _next_hop

BLOB = bytes(range(256)) * 64


class Recorder:
    """Two loopback servers: `origin` answers 307 to `cdn`, which serves BLOB with Range; both log headers."""

    def __init__(self) -> None:
        self.headers: list[tuple[str, dict[str, str]]] = []
        self.redirect_to = ""
        recorder = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                role = "origin" if self.server is recorder.origin else "cdn"
                recorder.headers.append((role, {k.lower(): v for k, v in self.headers.items()}))
                if role == "origin":
                    self.send_response(307)
                    self.send_header("Location", recorder.redirect_to)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(self.headers.get("Range", "bytes=0-").removeprefix("bytes=").rstrip("-"))
                self.send_response(206 if start else 200)
                if start:
                    self.send_header("Content-Range", f"bytes {start}-{len(BLOB) - 1}/{len(BLOB)}")
                self.send_header("Content-Length", str(len(BLOB) - start))
                self.end_headers()
                self.wfile.write(BLOB[start:])

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.origin = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.cdn = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.redirect_to = f"http://127.0.0.1:{self.cdn.server_address[1]}/fleet/abc"

    @property
    def origin_url(self) -> str:
        return f"http://127.0.0.1:{self.origin.server_address[1]}/api/v1/artifacts/abc?device=d&token=t"


@pytest.fixture
def servers() -> Iterator[Recorder]:
    recorder = Recorder()
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (recorder.origin, recorder.cdn)]
    for thread in threads:
        thread.start()
    try:
        yield recorder
    finally:
        for server in (recorder.origin, recorder.cdn):
            server.shutdown()
            server.server_close()


def test_download_follows_the_redirect_to_the_cdn_and_resumes_there_with_range(
    servers: Recorder, tmp_path: Path
) -> None:
    dest = tmp_path / "model.part"
    dest.write_bytes(BLOB[:1000])  # a part left by a dropped connection
    fetcher = ArtifactFetcher(timeout_s=10, attempts=1)
    try:
        fetcher.fetch(servers.origin_url, dest, expected_size=len(BLOB), cancelled=lambda: False)
    finally:
        fetcher.close()
    assert dest.read_bytes() == BLOB
    assert [role for role, _ in servers.headers] == ["origin", "cdn"]
    assert servers.headers[1][1]["range"] == "bytes=1000-"


def test_credentials_do_not_follow_a_redirect_to_another_origin(servers: Recorder, tmp_path: Path) -> None:
    fetcher = ArtifactFetcher(timeout_s=10, attempts=1)
    try:
        with fetcher._stream(servers.origin_url, {"Authorization": "Bearer secret"}) as response:
            assert response.read() == BLOB
    finally:
        fetcher.close()
    assert servers.headers[0][1]["authorization"] == "Bearer secret"
    assert "authorization" not in servers.headers[1][1]


def test_endless_redirects_fail_without_retrying(servers: Recorder, tmp_path: Path) -> None:
    servers.redirect_to = servers.origin_url
    fetcher = ArtifactFetcher(timeout_s=10, attempts=3)
    try:
        with pytest.raises(DownloadError, match="redirected more than 5 times"):
            fetcher.fetch(servers.origin_url, tmp_path / "m.part", expected_size=len(BLOB), cancelled=lambda: False)
    finally:
        fetcher.close()
    assert len(servers.headers) == 6  # one attempt: a loop does not heal by asking again


@pytest.mark.parametrize(
    ("source", "location", "followed"),
    [
        ("https://coord.test/a/x", "https://cdn.test/fleet/x", "https://cdn.test/fleet/x"),
        ("http://coord.test/a/x", "https://cdn.test/fleet/x", "https://cdn.test/fleet/x"),
        ("http://coord.test/a/x", "http://cdn.test/fleet/x", "http://cdn.test/fleet/x"),
        ("https://coord.test/a/x", "/fleet/x", "https://coord.test/fleet/x"),
        ("https://coord.test/a/x", "http://cdn.test/fleet/x", None),
        ("https://coord.test/a/x", "file:///etc/passwd", None),
    ],
)
def test_redirects_go_to_https_or_http_from_http_never_down_from_https(
    source: str, location: str, followed: str | None
) -> None:
    if followed is None:
        with pytest.raises(DownloadError, match="only https, or http from http"):
            _next_hop(source, location)
    else:
        assert _next_hop(source, location) == followed


def test_artifact_url_that_is_not_http_is_refused_without_retrying(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(BLOB)
    fetcher = ArtifactFetcher(timeout_s=10, attempts=3)
    try:
        with pytest.raises(DownloadError, match="only http and https"):
            fetcher.fetch(secret.as_uri(), tmp_path / "m.part", expected_size=len(BLOB), cancelled=lambda: False)
    finally:
        fetcher.close()
    assert not (tmp_path / "m.part").exists()


def test_unreachable_artifact_server_is_a_transient_download_error_retried(tmp_path: Path) -> None:
    server = ThreadingHTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)
    port = server.server_address[1]
    server.server_close()  # nothing listens there now: connection refused
    waits: list[float] = []

    def sleep(seconds: float) -> bool:
        waits.append(seconds)
        return False  # not interrupted

    fetcher = ArtifactFetcher(timeout_s=5, attempts=3, sleep=sleep)
    try:
        with pytest.raises(DownloadError, match="failed: ConnectionRefusedError"):
            fetcher.fetch(f"http://127.0.0.1:{port}/a", tmp_path / "m.part", expected_size=10, cancelled=lambda: False)
    finally:
        fetcher.close()
    assert waits == [0.5, 1.0]  # attempts 2 and 3 came after a backoff
