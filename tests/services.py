"""Real services for tests: an own Mosquitto per test session, a fresh PostgreSQL database, free ports.

A test that needs a service it cannot have is skipped with the reason, except under CI (`CI=true`),
where the same situation fails: CI must run everything.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

POSTGRES_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    """True when running under CI, where no service may be skipped."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip the test with `reason`, or fail it under CI."""
    if in_ci():
        pytest.fail(f"CI=true and a required service is unavailable: {reason}")
    pytest.skip(reason)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout: float = 10.0) -> bool:
    """Wait until something accepts TCP connections on host:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return True
        except OSError:
            time.sleep(0.05)
    return False


def mosquitto_binary() -> str | None:
    """Path of the Mosquitto broker binary, if installed."""
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


@contextmanager
def run_mosquitto(workdir: Path) -> Iterator[str]:
    """Start a private Mosquitto on a free loopback port; yields its `mqtt://` URL."""
    binary = mosquitto_binary()
    if binary is None:
        unavailable("Mosquitto is not installed (apt-get install mosquitto); MQTT end-to-end tests need it")
    assert binary is not None
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 100\n"
    )
    with _broker_process([binary, "-c", str(conf)], port, workdir / "mosquitto.log", unavailable) as url:
        yield url


@contextmanager
def run_amqtt(workdir: Path) -> Iterator[str]:
    """Start the embedded amqtt broker (`python -m cloud.broker`) in a process of its own on a free port.

    Its own process, as an external broker would be: in the test process it would compete for the GIL with
    the fleets under test and miss keepalives. amqtt is a Python dependency, so failing to start is a failure.
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cloud.broker", "--host", "127.0.0.1", "--port", str(port)]
    with _broker_process(command, port, workdir / "broker.log", pytest.fail) as url:
        yield url


@contextmanager
def _broker_process(
    command: list[str], port: int, log_path: Path, on_failure: Callable[[str], object]
) -> Iterator[str]:
    """Run a broker command that listens on 127.0.0.1:`port`; yields its URL, stops it afterwards."""
    log = log_path.open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        if not wait_for_port("127.0.0.1", port, timeout=30):
            on_failure(f"{Path(command[0]).name} did not start on port {port} (exit {proc.poll()}); see {log_path}")
        yield f"mqtt://127.0.0.1:{port}"
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """Create a uniquely named PostgreSQL database; yields its SQLAlchemy URL and drops it afterwards."""
    try:
        import psycopg
    except ImportError:
        unavailable("psycopg is not installed; PostgreSQL tests need the cloud extra")
    name = f"edgefleet_test_{uuid.uuid4().hex[:12]}"
    try:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        unavailable(f"PostgreSQL is not reachable at {POSTGRES_ADMIN_URL} ({exc}); set EDGEFLEET_TEST_POSTGRES")
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
