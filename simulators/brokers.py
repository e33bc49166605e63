"""Fleet brokers as processes of their own: Mosquitto configured by `edgefleet broker mosquitto-config`, or the
embedded amqtt broker (`python -m cloud.broker`), both admitting only the fleet's certificates; and a broker that
is itself a cluster: three NATS servers with JetStream and their MQTT gateway (`NatsCluster`).

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

import httpx

__all__ = [
    "BrokerStartError",
    "FleetBroker",
    "MosquittoProcess",
    "NatsCluster",
    "ensure_pki",
    "fleet_broker",
    "free_port",
    "mosquitto_binary",
    "nats_server_binary",
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
    made if missing); `persistence=False` is a broker that forgets everything it held when it dies; `replicas`
    names the coordinator replicas the ACL gives a coordinator's rights to.
    """

    def __init__(
        self,
        workdir: Path,
        data_dir: Path,
        topic_base: str,
        *,
        persistence: bool = False,
        replicas: tuple[str, ...] = (),
    ) -> None:
        binary = mosquitto_binary()
        if binary is None:
            raise BrokerStartError("Mosquitto is not installed (apt-get install mosquitto)")
        workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        user = "root" if os.geteuid() == 0 else ""  # as root, Mosquitto would switch to a user that cannot read here
        options = f"--port {self.port} --bind 127.0.0.1 --topic-base {topic_base} --user {user!r} --json"
        if not persistence:
            options += " --no-persistence"
        options += "".join(f" --replica {shlex.quote(name)}" for name in replicas)  # coordinator replicas' names
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


def nats_server_binary() -> str | None:
    """Path of the NATS server binary, if installed."""
    return shutil.which("nats-server")


class NatsCluster:
    """A NATS cluster of `nodes` servers on loopback, each with JetStream and an MQTT listener (plain TCP, anonymous).

    NATS keeps MQTT sessions, retained messages and QoS 1 messages in JetStream streams replicated over the
    cluster, so a client that loses its node finds its session on another. Its MQTT gateway (2.9) speaks MQTT
    3.1.1 only, QoS 0 and 1 (a QoS 2 publish closes the connection), grants a `$share/...` filter but delivers
    nothing to it, and refuses topics with `.` or spaces. `start()` waits until every node answers `/healthz`
    (JetStream has a leader); `kill(i)` SIGKILLs node `i` as a crash would.
    """

    def __init__(self, workdir: Path, *, nodes: int = 3, name: str = "edgefleet") -> None:
        binary = nats_server_binary()
        if binary is None:
            raise BrokerStartError("nats-server is not installed (https://nats.io: a single static binary)")
        self.workdir = workdir
        self.binary = binary
        self.mqtt_ports = [free_port() for _ in range(nodes)]
        self.monitor_ports = [free_port() for _ in range(nodes)]
        routes = [free_port() for _ in range(nodes)]
        self.configs: list[Path] = []
        for index in range(nodes):
            node = workdir / f"n{index}"
            node.mkdir(parents=True, exist_ok=True)
            others = ", ".join(f"nats-route://127.0.0.1:{port}" for port in routes)
            config = node / "nats.conf"
            config.write_text(
                f"server_name: n{index}\nlisten: 127.0.0.1:-1\nhttp: 127.0.0.1:{self.monitor_ports[index]}\n"
                f'jetstream {{ store_dir: "{node / "jetstream"}" }}\n'
                f"cluster {{ name: {name}, listen: 127.0.0.1:{routes[index]}, routes: [{others}] }}\n"
                f"mqtt {{ listen: 127.0.0.1:{self.mqtt_ports[index]} }}\n"
            )
            self.configs.append(config)
        self.procs: list[subprocess.Popen[bytes] | None] = [None] * nodes

    @property
    def urls(self) -> list[str]:
        """The `mqtt://` URL of every node, in node order."""
        return [f"mqtt://127.0.0.1:{port}" for port in self.mqtt_ports]

    def log(self, index: int) -> Path:
        """Node `index`'s log file."""
        return self.configs[index].parent / "nats.log"

    def start(self, timeout: float = 30.0) -> None:
        """Start every node and wait until each listens for MQTT and is healthy; `BrokerStartError` if not."""
        for index, config in enumerate(self.configs):
            with self.log(index).open("ab") as log:
                self.procs[index] = subprocess.Popen(
                    [self.binary, "-c", str(config)], stdout=log, stderr=subprocess.STDOUT
                )
        deadline = time.monotonic() + timeout
        for index in range(len(self.configs)):
            while not self._ready(index):
                proc = self.procs[index]
                if (proc is not None and proc.poll() is not None) or time.monotonic() > deadline:
                    self.stop()
                    raise BrokerStartError(f"NATS node {index} did not become ready; see {self.log(index)}")
                time.sleep(0.1)

    def _ready(self, index: int) -> bool:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", self.mqtt_ports[index])) != 0:
                return False
        try:  # 200 once JetStream is up and the cluster has a leader
            return httpx.get(f"http://127.0.0.1:{self.monitor_ports[index]}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def kill(self, index: int) -> None:
        """SIGKILL node `index`: its clients lose their connections, the others keep the cluster's streams."""
        proc = self.procs[index]
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
            proc.wait(10)

    def stop(self) -> None:
        """Stop every node still running."""
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                proc.terminate()
        for proc in self.procs:
            if proc is not None and proc.poll() is None:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def __enter__(self) -> NatsCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
