"""Alert webhooks against a real HTTP receiver on 127.0.0.1: signed, retried, failed, kept across a restart."""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from cloud.alerts import AlertRunner, evaluate_alerts
from cloud.alerts.webhooks import backoff_s, redact_url, sign
from cloud.app import create_app
from cloud.audit import list_entries
from cloud.models import AlertDelivery, TelemetryRecord
from cloud.settings import Settings
from protocol.messages import utcnow
from protocol.telemetry import latency_histogram
from tests.cloud.conftest import enrol_for_test
from tests.cloud.fleet_helpers import wait_until

SECRET = "a-webhook-secret-of-some-length"


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes
    status: int


@dataclass
class Receiver:
    """A webhook receiver answering `failures` requests with 500, then 204 (while `accepting`)."""

    failures: int = 0
    accepting: bool = True
    requests: list[Received] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    url: str = ""

    def answer(self, headers: dict[str, str], body: bytes) -> int:
        with self.lock:
            status = 500 if self.failures > 0 or not self.accepting else 204
            self.failures -= 1 if self.failures > 0 else 0
            self.requests.append(Received(headers, body, status))
            return status

    def delivered(self) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.status == 204]


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    state = Receiver()

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
            status = state.answer({k.lower(): v for k, v in self.headers.items()}, body)
            self.send_response(status)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *_args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://hook:pw@127.0.0.1:{server.server_address[1]}/alerts"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield state
    server.shutdown()
    server.server_close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def settings_for(tmp_path: Path, database_url: str, url: str, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": tmp_path / "coordinator",
        "database_url": database_url,
        "alert_tick_s": 0,
        "alert_webhook_urls": [url],
        "alert_webhook_secret": SECRET,
        "alert_webhook_backoff_s": 0.05,
        "alert_webhook_backoff_max_s": 0.2,
        "alert_webhook_max_attempts": 5,
        "alert_webhook_timeout_s": 2,
        "alert_delivery_poll_s": 0.02,
        "alert_min_inferences": 10,
    }
    return Settings(**(values | overrides))


def open_an_alert(engine: Engine, settings: Settings) -> None:
    """A device failing half its inferences, evaluated: one alert opened, one delivery per webhook."""
    enrol_for_test(engine, "b1", {"site": "b"})
    with Session(engine) as session:
        now = utcnow()
        session.add(
            TelemetryRecord(device_id="b1", seq=1, window_start=now, window_end=now, inference_count=100,
                            error_count=50, latency_histogram=latency_histogram([1.0] * 100))
        )  # fmt: skip
        session.commit()
    assert len(evaluate_alerts(engine=engine, settings=settings, now=utcnow()).opens) == 1


def deliveries(engine: Engine) -> list[AlertDelivery]:
    with Session(engine) as session:
        return list(session.exec(select(AlertDelivery)))


def test_a_receiver_failing_twice_gets_the_signed_alert_on_the_third_attempt(
    engine: Engine, receiver: Receiver, tmp_path: Path, database_url: str
) -> None:
    receiver.failures = 2
    settings = settings_for(tmp_path, database_url, receiver.url)
    open_an_alert(engine, settings)
    runner = AlertRunner(engine=engine, settings=settings)
    runner.start()
    try:
        (got,) = wait_until(receiver.delivered, what="a delivered webhook")
    finally:
        runner.stop()
    assert [r.status for r in receiver.requests] == [500, 500, 204]
    assert len({r.headers["x-edgefleet-delivery"] for r in receiver.requests}) == 1  # one delivery, three attempts
    timestamp = got.headers["x-edgefleet-timestamp"]
    expected = hmac.new(SECRET.encode(), f"{timestamp}.".encode() + got.body, hashlib.sha256).hexdigest()
    assert hmac.compare_digest(got.headers["x-edgefleet-signature"], f"sha256={expected}")
    assert abs(int(timestamp) - time.time()) < 60
    assert got.headers["x-edgefleet-event"] == "alert.opened"
    payload = json.loads(got.body)
    assert (payload["event"], payload["delivery"]) == ("alert.opened", got.headers["x-edgefleet-delivery"])
    assert (payload["alert"]["rule"], payload["alert"]["cohort"]) == ("error_rate", "device=b1")
    (row,) = deliveries(engine)
    assert (row.state, row.attempts, row.delivered_at is not None) == ("delivered", 3, True)
    assert runner.counters.delivered == 1 and runner.counters.failed_attempts == 2
    # A forged body does not verify against the signature that came with the real one.
    assert sign(SECRET, int(timestamp), got.body + b" ") != got.headers["x-edgefleet-signature"]


def test_a_receiver_down_for_good_marks_the_delivery_failed_after_max_attempts(
    engine: Engine, tmp_path: Path, database_url: str
) -> None:
    url = f"http://127.0.0.1:{free_port()}/alerts"  # nothing listens there
    settings = settings_for(tmp_path, database_url, url, alert_webhook_max_attempts=3)
    open_an_alert(engine, settings)
    runner = AlertRunner(engine=engine, settings=settings)
    runner.start()
    try:
        wait_until(lambda: deliveries(engine)[0].state == "failed", what="the delivery failed")
    finally:
        runner.stop()
    (row,) = deliveries(engine)
    assert row.attempts == 3 and "ConnectError" in (row.last_error or "")
    assert runner.counters.failed == 1
    with Session(engine) as session:
        (entry,) = list_entries(session=session, action="alert.delivery_failed")
    assert (entry.actor, entry.details["attempts"], entry.details["url"]) == ("coordinator", 3, url)


def test_a_delivery_pending_at_a_restart_is_delivered_by_the_next_coordinator(
    receiver: Receiver, tmp_path: Path, database_url: str
) -> None:
    receiver.accepting = False
    settings = settings_for(tmp_path, database_url, receiver.url, alert_webhook_max_attempts=50)
    first = create_app(settings, enable_mqtt=False)
    with TestClient(first):
        open_an_alert(first.state.coordinator.engine, settings)
        wait_until(lambda: receiver.requests, what="a first (refused) attempt")
    refused = len(receiver.requests)
    receiver.accepting = True  # the receiver comes back while no coordinator runs

    second = create_app(settings, enable_mqtt=False)
    with TestClient(second) as client:
        (got,) = wait_until(receiver.delivered, what="the delivery after the restart")
        detail = client.get(
            "/api/v1/alerts/1", headers={"Authorization": f"Bearer {second.state.coordinator.admin_token}"}
        )
    assert refused >= 1 and got.headers["x-edgefleet-event"] == "alert.opened"
    (delivery,) = detail.json()["deliveries"]
    assert delivery["state"] == "delivered" and delivery["attempts"] == refused + 1
    assert delivery["url"] == redact_url(receiver.url) and "pw" not in delivery["url"]  # no credentials shown


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 1.0, 2.0), (2, 1.0, 4.0), (4, 1.0, 16.0), (10, 1.0, 600.0), (3, 0.5, 4.0), (200, 1.0, 600.0)],
)
def test_backoff_doubles_per_attempt_up_to_its_cap(attempt: int, jitter: float, expected: float) -> None:
    assert backoff_s(attempt, base_s=2.0, max_s=600.0, jitter=jitter) == expected


def test_webhook_urls_are_logged_and_shown_without_credentials() -> None:
    assert redact_url("https://user:secret@hooks.example:8443/x?y=1") == "https://hooks.example:8443/x?y=1"
    assert redact_url("https://hooks.example/x") == "https://hooks.example/x"


def test_a_placeholder_webhook_secret_is_refused_in_production(tmp_path: Path) -> None:
    from cloud.errors import ConfigurationError

    settings = Settings(
        data_dir=tmp_path, environment="production", alert_webhook_urls=["https://hooks.example/x"],
        alert_webhook_secret="changeme",
    )  # fmt: skip
    with pytest.raises(ConfigurationError, match="ALERT_WEBHOOK_SECRET"):
        settings.check_production_ready()
    with pytest.raises(ValueError, match="not an http"):
        Settings(data_dir=tmp_path, alert_webhook_urls=["ftp://user:pw@hooks.example/x"])
