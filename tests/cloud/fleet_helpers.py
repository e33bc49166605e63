"""Helpers of the ingest tests: a coordinator on a real broker and database, devices enrolled through the service."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi import FastAPI
from fastapi.testclient import TestClient
from sqlmodel import Session

from cloud.app import create_app
from cloud.coordinator import Coordinator
from cloud.services import enrolment
from cloud.settings import Settings
from protocol.identity import EnrolmentRequest
from protocol.messages import TelemetryWindow, utcnow
from protocol.telemetry import latency_histogram
from tests.cloud.conftest import Api


def enrol(coordinator: Coordinator, device_id: str, *, tags: dict[str, str] | None = None) -> None:
    """Enrol `device_id` the way the fleet does: an operator's one-time token, then the device's CSR."""
    with Session(coordinator.engine) as session:
        token, _ = enrolment.create_enrolment_token(
            session=session, device_id=device_id, tags=tags or {}, ttl_s=600, created_by="test"
        )
        request = EnrolmentRequest(device_id=device_id, csr_pem=_csr(device_id), token=token)
        enrolment.enrol_device(session=session, pki=coordinator.fleet_pki(), request=request, days=1)


def _csr(device_id: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@contextmanager
def live_coordinator(
    tmp_path: Path, *, mqtt_url: str, topic_base: str, database_url: str | None = None, **settings: Any
) -> Iterator[Api]:
    """A coordinator app bridged to `mqtt_url` (SQLite unless `database_url`), its bridge connected."""
    fields: dict[str, Any] = {"data_dir": tmp_path / "coordinator", "mqtt_url": mqtt_url, "topic_base": topic_base}
    if database_url is not None:
        fields["database_url"] = database_url
    app = create_app(Settings(port=8080, **fields, **settings))
    with TestClient(app) as client:
        api = api_for(app, client)
        assert api.coordinator.bridge is not None and api.coordinator.bridge.wait_connected(10)
        yield api


def api_for(app: FastAPI, client: TestClient) -> Api:
    """The `Api` of `tests.cloud.conftest` on a started app: its client sends the admin token."""
    coordinator = app.state.coordinator
    client.headers["Authorization"] = f"Bearer {coordinator.admin_token}"
    return Api(client, coordinator, TestClient(app))


def window(device_id: str, seq: int, count: int = 10) -> TelemetryWindow:
    """A telemetry window of `count` inferences."""
    now = utcnow()
    return TelemetryWindow(
        device_id=device_id,
        seq=seq,
        window_start=now,
        window_end=now,
        inference_count=count,
        error_count=0,
        latency_histogram=latency_histogram([1.0] * count),
        class_counts={"1": count},
    )


def wait_until(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll `check` until it returns something truthy; AssertionError after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {timeout}s")
        time.sleep(0.05)
