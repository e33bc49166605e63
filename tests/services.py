"""Real services for tests: an own Mosquitto per test session, a fresh PostgreSQL database, free ports.

A test that needs a service it cannot have is skipped with the reason, except under CI (`CI=true`),
where the same situation fails: CI must run everything.
"""

from __future__ import annotations

import importlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from simulators.brokers import FleetBroker, fleet_broker, free_port, mosquitto_binary

POSTGRES_ADMIN_URL = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")


def in_ci() -> bool:
    """True when running under CI, where no service may be skipped."""
    return os.environ.get("CI", "").lower() in {"1", "true", "yes"}


def unavailable(reason: str) -> None:
    """Skip the test with `reason`, or fail it under CI."""
    if in_ci():
        pytest.fail(f"CI=true and a required service is unavailable: {reason}")
    pytest.skip(reason)


def require_module(name: str, why: str, *, module_level: bool = False) -> Any:
    """Import `name`; when it is not installed skip with `why` — or fail under CI, where everything is installed."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        reason = f"{name} is not installed ({exc}): {why}"
        if in_ci():
            pytest.fail(f"CI=true and a required package is missing: {reason}", pytrace=False)
        pytest.skip(reason, allow_module_level=module_level)


CONVERT_EXTRA = "the convert extra (torch, litert-torch): `pip install -e .[convert]`"


def require_convert_extra(*, module_level: bool = False) -> tuple[Any, Any]:
    """`(torch, litert_torch)`, or a skip (a failure under CI) when the convert extra is not installed."""
    return (
        require_module("torch", CONVERT_EXTRA, module_level=module_level),
        require_module("litert_torch", CONVERT_EXTRA, module_level=module_level),
    )


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


@contextmanager
def run_mosquitto(workdir: Path, *, anonymous: bool = True) -> Iterator[str]:
    """Start a private Mosquitto on a free loopback port; yields its `mqtt://` URL. `anonymous=False`: it refuses
    every client (no password file: CONNACK "not authorized")."""
    binary = mosquitto_binary()
    if binary is None:
        unavailable("Mosquitto is not installed (apt-get install mosquitto); MQTT end-to-end tests need it")
    assert binary is not None
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous {str(anonymous).lower()}\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 100\n"
    )
    with _broker_process([binary, "-c", str(conf)], port, workdir / "mosquitto.log", unavailable) as url:
        yield url


@contextmanager
def run_amqtt(workdir: Path) -> Iterator[str]:
    """Start a bare amqtt broker (`python -m cloud.broker --allow-anonymous`) in a process of its own on a free port.

    Its own process, as an external broker would be: in the test process it would compete for the GIL with
    the fleets under test and miss keepalives. amqtt is a Python dependency, so failing to start is a failure.
    """
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "cloud.broker", "--host", "127.0.0.1", "--port", str(port), "--allow-anonymous"]
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


# -- a PostgreSQL server of the test's own (to stop and start it) --------------------------------------------


def postgres_bin_dir() -> Path | None:
    """The directory holding the newest installed PostgreSQL server binaries (`initdb`, `postgres`), if any."""
    versions = sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda d: d.parent.name.zfill(8), reverse=True)
    on_path = shutil.which("initdb")
    for directory in [*versions, *([Path(on_path).parent] if on_path else [])]:
        if (directory / "initdb").exists() and (directory / "postgres").exists():
            return directory
    return None


class OwnPostgres:
    """A private PostgreSQL server on a free port; `stop()` and `start()` it to make the database go away and back.

    initdb and postgres refuse to run as root: as root they run as the `postgres` OS user.
    """

    _SIGNALS = {"smart": signal.SIGTERM, "fast": signal.SIGINT, "immediate": signal.SIGQUIT}

    def __init__(self, bin_dir: Path, root: Path, user: pwd.struct_passwd | None) -> None:
        self.bin_dir = bin_dir
        self.root = root
        self.data = root / "data"
        self.port = free_port()
        self._user = user
        self._proc: subprocess.Popen[bytes] | None = None
        self._log = root / "postgres.log"

    @property
    def url(self) -> str:
        """SQLAlchemy URL of the `edgefleet` database on this server."""
        return f"postgresql+psycopg://postgres@127.0.0.1:{self.port}/edgefleet"

    @property
    def running(self) -> bool:
        """True while the server process runs."""
        return self._proc is not None and self._proc.poll() is None

    def _run_as(self) -> dict[str, Any]:
        """Popen arguments running a command as the server's OS user (nothing when that is us)."""
        if self._user is None:
            return {}
        return {"user": self._user.pw_uid, "group": self._user.pw_gid, "extra_groups": []}

    def init(self) -> None:
        """initdb the data directory and create the `edgefleet` database (starts the server)."""
        command = [str(self.bin_dir / "initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust", "-E", "UTF8"]
        done = subprocess.run([*command, "--no-sync"], capture_output=True, check=False, **self._run_as())
        if done.returncode != 0:
            unavailable(f"initdb failed (exit {done.returncode}): {done.stderr.decode(errors='replace')[-500:]}")
        self.start()
        import psycopg

        with psycopg.connect(self._admin_dsn(), autocommit=True) as conn:
            conn.execute("CREATE DATABASE edgefleet")

    def start(self) -> None:
        """Start the server on its port and wait until it accepts connections."""
        settings = ["listen_addresses=127.0.0.1", f"unix_socket_directories={self.root}", "fsync=off"]
        command = [str(self.bin_dir / "postgres"), "-D", str(self.data), "-p", str(self.port)]
        for setting in settings:
            command += ["-c", setting]
        with self._log.open("ab") as log:
            self._proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, **self._run_as())
        self._wait_ready()

    def stop(self, mode: str = "fast") -> None:
        """Shut the server down (`smart`, `fast` or `immediate`, as `pg_ctl stop -m`) and wait for it to exit."""
        if self._proc is None:
            return
        if self._proc.poll() is None:
            self._proc.send_signal(self._SIGNALS[mode])
            self._proc.wait(60)
        self._proc = None

    def _admin_dsn(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _wait_ready(self, timeout: float = 60.0) -> None:
        import psycopg

        deadline = time.monotonic() + timeout
        while True:
            try:
                psycopg.connect(self._admin_dsn(), connect_timeout=2).close()
                return
            except psycopg.OperationalError as exc:
                if self._proc is None or self._proc.poll() is not None or time.monotonic() > deadline:
                    tail = self._log.read_text(errors="replace")[-800:] if self._log.exists() else ""
                    pytest.fail(f"own PostgreSQL did not start on port {self.port}: {exc}\n{tail}")
                time.sleep(0.1)


@contextmanager
def run_own_postgres() -> Iterator[OwnPostgres]:
    """A private, initialised PostgreSQL server (skipped with the reason, or failed under CI, when impossible)."""
    try:
        import psycopg  # noqa: F401
    except ImportError:
        unavailable("psycopg is not installed; PostgreSQL tests need the cloud extra")
    bin_dir = postgres_bin_dir()
    if bin_dir is None:
        unavailable("PostgreSQL server binaries (initdb, postgres) are not installed (apt-get install postgresql)")
    assert bin_dir is not None
    user = None
    if os.geteuid() == 0:
        try:
            user = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root, and there is no `postgres` OS user to run initdb and postgres as")
    root = Path(tempfile.mkdtemp(prefix="edgefleet-pg-"))
    if user is not None:
        os.chown(root, user.pw_uid, user.pw_gid)
    server = OwnPostgres(bin_dir, root, user)
    try:
        server.init()
        yield server
    finally:
        server.stop("fast")
        shutil.rmtree(root, ignore_errors=True)


# -- fleet brokers: TLS with the fleet's client certificates and per-device topic rights -----------------


@contextmanager
def run_fleet_broker(kind: str, workdir: Path, data_dir: Path, topic_base: str) -> Iterator[FleetBroker]:
    """A fleet broker of `kind` (`simulators.brokers`); a missing Mosquitto skips (fails under CI)."""
    if kind == "mosquitto" and mosquitto_binary() is None:
        unavailable("Mosquitto is not installed (apt-get install mosquitto); MQTT end-to-end tests need it")
    with fleet_broker(kind, workdir, data_dir, topic_base) as broker:
        yield broker


@contextmanager
def run_fleet_mosquitto(workdir: Path, data_dir: Path, topic_base: str) -> Iterator[FleetBroker]:
    """Mosquitto configured by `edgefleet broker mosquitto-config` for the coordinator in `data_dir`."""
    with run_fleet_broker("mosquitto", workdir, data_dir, topic_base) as broker:
        yield broker
