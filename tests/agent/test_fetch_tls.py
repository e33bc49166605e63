"""Artifact downloads over https: verified against the CA store, whose context is made only for https."""

from __future__ import annotations

import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

import agent.update.fetch as fetch
from agent.errors import DownloadError
from agent.update.fetch import ArtifactFetcher
from cloud.pki import FleetPki

BLOB = bytes(range(256)) * 16


def _certificates(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A CA (its PEM) and a server certificate for 127.0.0.1 that it signed (PEM, key PEM): the fleet's own PKI."""
    pki = FleetPki(tmp_path / "pki").ensure()
    cert, key = pki.broker_files()  # a server identity covering localhost and 127.0.0.1
    return pki.ca_path, cert, key


class _Blob(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BLOB)))
        self.end_headers()
        self.wfile.write(BLOB)

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextmanager
def _serve(server: ThreadingHTTPServer) -> Iterator[str]:
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def ca_and_https(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """The CA's PEM and the base URL of an https server whose certificate it signed."""
    ca, cert, key = _certificates(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Blob)
    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(cert, key)
    server.socket = tls.wrap_socket(server.socket, server_side=True)
    with _serve(server) as address:
        yield ca, f"https://{address}"


def _download(url: str, dest: Path) -> None:
    fetcher = ArtifactFetcher(timeout_s=10, attempts=1)
    try:
        fetcher.fetch(url, dest, expected_size=len(BLOB), cancelled=lambda: False)
    finally:
        fetcher.close()


def test_https_artifact_is_downloaded_from_a_server_the_ca_store_trusts(
    ca_and_https: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ca, url = ca_and_https
    monkeypatch.setenv("SSL_CERT_FILE", str(ca))
    _download(f"{url}/model.onnx", tmp_path / "m.part")
    assert (tmp_path / "m.part").read_bytes() == BLOB


def test_https_artifact_from_a_server_the_ca_store_does_not_trust_is_refused(
    ca_and_https: tuple[Path, str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, url = ca_and_https
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)
    with pytest.raises(DownloadError, match="CERTIFICATE_VERIFY_FAILED"):
        _download(f"{url}/model.onnx", tmp_path / "m.part")


def test_http_download_never_reads_the_ca_bundle(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_tls() -> ssl.SSLContext:
        raise AssertionError("a TLS context was made for an http download")

    monkeypatch.setattr(fetch, "_tls_context", no_tls)
    with _serve(ThreadingHTTPServer(("127.0.0.1", 0), _Blob)) as address:
        _download(f"http://{address}/model.onnx", tmp_path / "m.part")
    assert (tmp_path / "m.part").read_bytes() == BLOB
