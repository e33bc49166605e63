"""Fleet brokers as processes of their own: Mosquitto configured by `edgefleet broker mosquitto-config`, or the
embedded amqtt broker (`python -m cloud.broker`), both admitting only the fleet's certificates.

For tests, benchmarks and demos that need a broker outside the coordinator. Everything goes through the
`edgefleet` commands a user would run (no coordinator code is imported here).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "BrokerStartError",
    "FleetBroker",
    "MosquittoProcess",
    "ensure_pki",
    "fleet_broker",
    "free_port",
    "mosquitto_binary",
    "plain_mosquitto",
]


class BrokerStartError(RuntimeError):
    """A broker did not start (not installed, bad configuration); the message says why."""


@dataclass(frozen=True)
class FleetBroker:
    """A running fleet broker: its URL, and the `edgefleet up` options that keep its CRL current."""

    kind: str
    url: str
    coordinator_args: tuple[str, ...] = ()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def mosquitto_binary() -> str | None:
    """Path of the Mosquitto broker binary, if installed."""
    return shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)


def _edgefleet() -> str:
    return str(Path(sys.executable).parent / "edgefleet")


def _run_json(command: list[str]) -> dict[str, str]:
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    if done.returncode != 0:
        raise BrokerStartError(f"{' '.join(command[:3])} failed: {done.stdout}{done.stderr}")
    return dict(json.loads(done.stdout))


def ensure_pki(data_dir: Path) -> Path:
    """The coordinator's fleet PKI directory (created by `edgefleet broker pki` when missing)."""
    return Path(_run_json([_edgefleet(), "broker", "pki", "--data-dir", str(data_dir), "--json"])["pki_dir"])


@contextmanager
def _process(command: list[str], port: int, log_path: Path) -> Iterator[None]:
    log = log_path.open("wb")
    proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", port)) == 0:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerStartError(f"{Path(command[0]).name} did not start on port {port}; see {log_path}")
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


@contextmanager
def _mosquitto(workdir: Path, data_dir: Path, topic_base: str) -> Iterator[FleetBroker]:
    broker = MosquittoProcess(workdir, data_dir, topic_base)  # no persistence
    broker.start()
    try:
        yield FleetBroker("mosquitto", broker.url, broker.coordinator_args)
    finally:
        broker.stop()


@contextmanager
def _amqtt(workdir: Path, data_dir: Path, topic_base: str) -> Iterator[FleetBroker]:
    pki_dir = ensure_pki(data_dir)
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable, "-m", "cloud.broker", "--host", "127.0.0.1", "--port", str(port),
        "--pki-dir", str(pki_dir), "--topic-base", topic_base,
    ]  # fmt: skip
    with _process(command, port, workdir / "broker.log"):
        yield FleetBroker("amqtt", f"mqtts://127.0.0.1:{port}")


@contextmanager
def fleet_broker(kind: str, workdir: Path, data_dir: Path, topic_base: str) -> Iterator[FleetBroker]:
    """A fleet broker of `kind` (`mosquitto` or `amqtt`) for the coordinator whose data dir is `data_dir`."""
    if kind not in ("mosquitto", "amqtt"):
        raise ValueError(f"unknown broker kind {kind!r}")
    workdir.mkdir(parents=True, exist_ok=True)
    runner = _mosquitto if kind == "mosquitto" else _amqtt
    with runner(workdir, data_dir, topic_base) as broker:
        yield broker


class MosquittoProcess:
    """The fleet's Mosquitto on a port of its own, which its caller starts, SIGKILLs and starts again.

    Configured once by `edgefleet broker mosquitto-config` for the coordinator in `data_dir` (the fleet PKI is
    made if missing); `persistence=False` is a broker that forgets everything it held when it dies.
    """

    def __init__(self, workdir: Path, data_dir: Path, topic_base: str, *, persistence: bool = False) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerStartError("Mosquitto is not installed (apt-get install mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = "root" if os.geteuid() == 0 else ""  # as root, Mosquitto would switch to a user that cannot read here
        options = f"--port {self.port} --bind 127.0.0.1 --topic-base {topic_base} --user {user!r} --json"
        if not persistence:
            options += " --no-persistence"
        command = [_edgefleet(), "broker", "mosquitto-config", "--out", str(workdir), "--data-dir", str(data_dir)]
        info = _run_json(command + shlex.split(options))
        self.command = [binary, "-c", info["config"]]
        crl, reload = info["broker_crl_file"], info["broker_reload_command"]
        self.coordinator_args = ("--broker-crl-file", crl, "--broker-reload-command", reload)
        self.url = f"mqtts://127.0.0.1:{self.port}"
        self.log = workdir / "mosquitto.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Start it and wait until it listens; `BrokerStartError` if it does not."""
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while True:
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", self.port)) == 0:
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise BrokerStartError(f"mosquitto did not start on port {self.port}; see {self.log}")
            time.sleep(0.02)

    def kill(self) -> None:
        """SIGKILL, as a crash would: no will, no persistence written on the way out."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()


@contextmanager
def plain_mosquitto(workdir: Path) -> Iterator[str]:
    """Mosquitto on plain TCP, anonymous, no ACL, no persistence, on a free port: a benchmark's baseline broker."""
    binary = mosquitto_binary()
    if binary is None:
        raise BrokerStartError("Mosquitto is not installed (apt-get install mosquitto)")
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    conf = workdir / "mosquitto.conf"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 100000\nmax_inflight_messages 100\nset_tcp_nodelay true\n"
    )
    with _process([binary, "-c", str(conf)], port, workdir / "mosquitto.log"):
        yield f"mqtt://127.0.0.1:{port}"
