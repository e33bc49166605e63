"""The agent's Flower SuperNode against a real SuperLink (TLS, node authentication), from the Flower venv.

Real parts: `flower-superlink` with a CA and server certificate made here, `flwr supernode register/list`,
agents whose enrolment key is registered (or not), the agent's own `flower-supernode` under its guard.
Without `.venv-flower` these tests skip (and fail under CI=true).
"""

from __future__ import annotations

import contextlib
import datetime
import http.server
import ipaddress
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from agent import Agent, AgentConfig, ConfigError, load_config
from agent.federation import (
    Backoff,
    FederationInfo,
    FederationStatus,
    SupernodeSupervisor,
    classify_exit,
    fetch_federation,
    locate_supernode,
    node_config,
    node_key_openssh,
)
from agent.samples import sample_store_path
from protocol import DeviceEvent, EventKind, Topics
from tests.agent.conftest import Observer
from tests.services import free_port, unavailable, wait_for_port

pytestmark = pytest.mark.e2e

FLOWER_BIN = Path(
    os.environ.get("EDGEFLEET_FLOWER_BIN_DIR") or Path(__file__).resolve().parents[2] / ".venv-flower" / "bin"
)
ONLINE_TIMEOUT = 120.0  # a SuperNode's start on a loaded 2-core machine takes a few seconds, its TLS join more


def flower_bin() -> Path:
    """The Flower venv's bin directory; a skip (a failure under CI) without it."""
    if not (FLOWER_BIN / "flower-superlink").exists() or not (FLOWER_BIN / "flower-supernode").exists():
        unavailable(f"the Flower venv is missing ({FLOWER_BIN}): `make flower` builds it")
    return FLOWER_BIN


def flower_env(home: Path) -> dict[str, str]:
    return dict(
        os.environ,
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=f"{FLOWER_BIN}{os.pathsep}{os.environ.get('PATH', '')}",  # it starts flower-superexec by name
    )


# -- certificates ------------------------------------------------------------------------------------------


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _pem(value: x509.Certificate | ec.EllipticCurvePrivateKey) -> bytes:
    if isinstance(value, x509.Certificate):
        return value.public_bytes(serialization.Encoding.PEM)
    return value.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


class Pki:
    """A P-256 CA, the SuperLink's server certificate (SAN 127.0.0.1) and device certificates it issues."""

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.ca_key = ec.generate_private_key(ec.SECP256R1())
        self.ca = self._certificate(_name("edgefleet test CA"), self.ca_key.public_key(), ca=True)
        self.ca_path = directory / "ca.pem"
        self.ca_path.write_bytes(_pem(self.ca))
        server_key = ec.generate_private_key(ec.SECP256R1())
        server = self._certificate(_name("127.0.0.1"), server_key.public_key(), ca=False, server=True)
        self.server_cert, self.server_key = directory / "server.pem", directory / "server.key"
        self.server_cert.write_bytes(_pem(server))
        self.server_key.write_bytes(_pem(server_key))

    def _certificate(self, subject: x509.Name, public_key: Any, *, ca: bool, server: bool = False) -> x509.Certificate:
        now = datetime.datetime.now(datetime.UTC)
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(_name("edgefleet test CA"))
            .public_key(public_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        )
        if server:
            san = [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
            builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return builder.sign(self.ca_key, hashes.SHA256())

    def enrolled_device(self, data_dir: Path, device_id: str) -> Path:
        """An identity directory as `edgefleet-agent enroll` leaves it (key, certificate, CA, identity.json)."""
        directory = data_dir / "identity"
        directory.mkdir(parents=True)
        key = ec.generate_private_key(ec.SECP256R1())
        (directory / "device.key").write_bytes(_pem(key))
        (directory / "device.key").chmod(0o600)
        (directory / "device.crt").write_bytes(_pem(self._certificate(_name(device_id), key.public_key(), ca=False)))
        (directory / "ca.crt").write_bytes(_pem(self.ca))
        meta: dict[str, Any] = {
            "device_id": device_id,
            "broker_url": "mqtt://127.0.0.1:1",
            "topic_base": "edgefleet/v1",
            "coordinator_url": "http://127.0.0.1:1",
            "tags": {},
            "tuf_url": None,
        }
        (directory / "identity.json").write_text(json.dumps(meta))
        return directory / "device.key"


# -- a SuperLink and its CLI -------------------------------------------------------------------------------


class SuperLink:
    """`flower-superlink` with TLS and node authentication on a free port, and `flwr` pointed at it."""

    def __init__(self, directory: Path, pki: Pki) -> None:
        self.directory = directory
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.home = directory / "flwr-home"
        self.home.mkdir(parents=True)
        (self.home / "config.toml").write_text(
            f'[superlink]\ndefault = "test"\n\n[superlink.test]\naddress = "{self.address}"\n'
            f'root-certificates = "{pki.ca_path}"\n'
        )
        command = [
            str(FLOWER_BIN / "flower-superlink"),
            "--port", str(self.port),
            "--ssl-ca-certfile", str(pki.ca_path),
            "--ssl-certfile", str(pki.server_cert),
            "--ssl-keyfile", str(pki.server_key),
            "--enable-supernode-auth",
            "--database", str(directory / "superlink.db"),
            "--disable-runtime-dependency-installation",
        ]  # fmt: skip
        self.log = directory / "superlink.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env=flower_env(self.home), start_new_session=True
            )
        if not wait_for_port("127.0.0.1", self.port, timeout=90):
            self.stop()
            pytest.fail(f"flower-superlink did not listen on {self.port}: {self.log.read_text()[-2000:]}")

    def flwr(self, *args: str) -> dict[str, Any]:
        done = subprocess.run(
            [str(FLOWER_BIN / "flwr"), *args, "--format", "json"],
            capture_output=True,
            text=True,
            env=flower_env(self.home),
            timeout=60,
            check=False,
        )
        answer: dict[str, Any] = json.loads(done.stdout)
        assert answer.get("success"), f"flwr {' '.join(args)} failed: {answer} {done.stderr[-500:]}"
        return answer

    def register(self, public_key: Path, name: str) -> str:
        return str(self.flwr("supernode", "register", str(public_key), "test", "--name", name)["node-id"])

    def status(self, node_id: str) -> str | None:
        nodes = self.flwr("supernode", "list", "test")["nodes"]
        return next((n["status"] for n in nodes if str(n["node-id"]) == node_id), None)

    def stop(self) -> None:
        # Its SuperExec runs in a session of its own (Flower detaches it) and exits when the SuperLink has.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return Pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def superlink(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[SuperLink]:
    flower_bin()
    link = SuperLink(tmp_path_factory.mktemp("superlink"), pki)
    yield link
    link.stop()


# -- processes ---------------------------------------------------------------------------------------------


def _stat(pid: int) -> tuple[str, int, int] | None:
    """`(state, ppid, pgid)` of a process, None when it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1]), int(fields[2])


def live_group(pgid: int) -> list[int]:
    """Processes of process group `pgid` that still run (zombies, which PID 1 here may never reap, do not)."""
    pids = [int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()]
    return [pid for pid in pids if (stat := _stat(pid)) is not None and stat[2] == pgid and stat[0] != "Z"]


def supernode_pid(guard: int, timeout: float = 30.0) -> int:
    """The `flower-supernode` process the guard started."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in live_group(guard):
            stat = _stat(pid)
            if pid != guard and stat is not None and stat[1] == guard:
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no flower-supernode under guard {guard}")


def wait_until(predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.5) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"{what}: not within {timeout:.0f}s")
        time.sleep(interval)


def public_key_file(key_path: Path, target: Path) -> Path:
    target.write_bytes(node_key_openssh(key_path)[1])
    return target


def federated_config(data_dir: Path, device_id: str, link: SuperLink, pki: Pki, **extra: Any) -> AgentConfig:
    settings: dict[str, Any] = {
        "device_id": device_id,
        "data_dir": data_dir,
        "mqtt_url": f"mqtt://127.0.0.1:{free_port()}",  # no broker: the SuperNode must not depend on MQTT
        "http_port": None,
        "federated": True,
        "superlink": link.address,
        "superlink_root_certificates": pki.ca_path,
        "flower_bin_dir": flower_bin(),
        "sample_rates": {"digits": 1.0},
    }
    settings.update(extra)
    return AgentConfig(**settings)


# -- the SuperNode's life with the agent -------------------------------------------------------------------


@pytest.mark.timeout(400)
def test_registered_device_joins_is_restarted_after_a_kill_and_leaves_with_the_agent(
    tmp_path: Path, superlink: SuperLink, pki: Pki
) -> None:
    data_dir = tmp_path / "dev-a"
    key = pki.enrolled_device(data_dir, "dev-a")
    node_id = superlink.register(public_key_file(key, tmp_path / "dev-a.pub"), "dev-a")

    agent = Agent(federated_config(data_dir, "dev-a", superlink, pki))
    agent.start()
    try:
        wait_until(lambda: superlink.status(node_id) == "online", ONLINE_TIMEOUT, "registered node online")
        status = wait_until(lambda: agent.federation_status.node_id and agent.federation_status, 30, "node id")
        assert status.state == "running" and status.node_id == node_id and status.restarts == 0
        assert status.superlink == superlink.address

        federated = data_dir / "federated"
        assert (federated / "node_key").stat().st_mode & 0o777 == 0o600
        assert (federated / "node_key").read_bytes().startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        assert (federated / "node_key.pub").read_bytes() == node_key_openssh(key)[1]
        assert (federated / "root.pem").read_bytes() == pki.ca_path.read_bytes()
        guard = status.pid
        assert guard is not None
        first = supernode_pid(guard)
        command = Path(f"/proc/{first}/cmdline").read_bytes().split(b"\0")
        store = str(sample_store_path(data_dir)).encode()
        assert b'sample-store="' + store + b'" device-id="dev-a"' in command
        port = int(command[command.index(b"--port") + 1])
        assert port != 9094  # a free port of its own, not Flower's default
        log_text = (federated / "supernode.log").read_text()
        assert "SuperNode ID" in log_text and "\x1b[" not in log_text  # plain text, colour codes removed

        os.kill(first, signal.SIGKILL)  # the SuperNode crashes
        crashed = wait_until(lambda: agent.federation_status.restarts >= 1 and agent.federation_status, 30, "restart")
        assert crashed.pid != guard
        # The SuperLink holds the dead node's session until its heartbeat lapses (up to a minute) and refuses the
        # node meanwhile with the same code as an unknown key: retried as a failure, not reported as a refusal.
        seen: list[FederationStatus] = []

        def rejoined() -> FederationStatus | None:
            status = agent.federation_status
            seen.append(status)
            return status if status.node_id == node_id and status.state == "running" else None

        restarted = wait_until(rejoined, ONLINE_TIMEOUT, "same node id after the restart")
        assert "refused" not in {s.state for s in seen}
        assert restarted.restarts >= 1 and restarted.pid != guard
        exits = {s.last_exit_code for s in seen} | {crashed.last_exit_code}
        assert 128 + signal.SIGKILL in exits or 1 in exits
        second = supernode_pid(restarted.pid)
        assert second != first
        wait_until(lambda: superlink.status(node_id) == "online", ONLINE_TIMEOUT, "online again")
        group = restarted.pid
    finally:
        agent.stop()
    assert live_group(group) == [], "a Flower process of the stopped agent is still running"
    assert agent.federation_status.state == "stopped"
    wait_until(lambda: superlink.status(node_id) == "offline", ONLINE_TIMEOUT, "node offline after the agent stops")


@pytest.mark.timeout(300)
def test_unregistered_device_is_refused_reported_and_not_retried_hot(
    tmp_path: Path, superlink: SuperLink, pki: Pki, mosquitto_url: str, topic_base: str
) -> None:
    data_dir = tmp_path / "dev-u"
    pki.enrolled_device(data_dir, "dev-u")  # never registered
    observer = Observer(mosquitto_url, Topics(topic_base))
    agent = Agent(federated_config(data_dir, "dev-u", superlink, pki, mqtt_url=mosquitto_url, topic_base=topic_base))
    agent.start()
    try:
        refused = wait_until(
            lambda: agent.federation_status.state == "refused" and agent.federation_status, 90, "refusal"
        )
        assert refused.last_flower_code == 305 and refused.last_exit_code == 1
        assert "refused" in refused.last_error and "[code: 2004]" in refused.last_error
        assert "flwr supernode register" in refused.last_error
        event: DeviceEvent = observer.event("dev-u", lambda e: e.kind is EventKind.FEDERATED_REFUSED, timeout=20)
        assert "not registered" in event.message
        time.sleep(8)  # a slow backoff: no new attempt this soon
        later = agent.federation_status
        assert later.state == "refused" and later.restarts == 0 and later.pid is None
    finally:
        agent.stop()
        observer.close()


@pytest.mark.timeout(300)
def test_a_sigkilled_agent_leaves_no_supernode_behind(tmp_path: Path, superlink: SuperLink, pki: Pki) -> None:
    data_dir = tmp_path / "dev-k"
    key = pki.enrolled_device(data_dir, "dev-k")
    node_id = superlink.register(public_key_file(key, tmp_path / "dev-k.pub"), "dev-k")
    config = federated_config(data_dir, "dev-k", superlink, pki)
    script = (
        "import json, sys, time\n"
        "from agent import Agent, AgentConfig\n"
        "agent = Agent(AgentConfig.model_validate_json(sys.argv[1]))\n"
        "agent.start()\n"
        "while True:\n"
        "    s = agent.federation_status\n"
        "    print(json.dumps({'state': s.state, 'pid': s.pid, 'node': s.node_id}), flush=True)\n"
        "    time.sleep(0.5)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, config.model_dump_json()], stdout=subprocess.PIPE, text=True, cwd=Path.cwd()
    )
    try:
        assert proc.stdout is not None
        guard = None
        deadline = time.monotonic() + ONLINE_TIMEOUT
        for line in proc.stdout:
            status = json.loads(line)
            if status["node"] == node_id:
                guard = status["pid"]
                break
            assert time.monotonic() < deadline, f"the agent's SuperNode did not join: {status}"
        assert guard is not None
        node = supernode_pid(guard)
        proc.kill()  # SIGKILL: the agent cannot stop anything itself
        proc.wait(10)
        wait_until(lambda: not live_group(guard), 20, f"Flower processes of group {guard} gone", interval=0.2)
        assert _stat(node) is None or _stat(node)[0] == "Z"  # type: ignore[index]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.timeout(300)
def test_a_changed_enrolment_key_is_rewritten_and_the_supernode_restarted_with_it(
    tmp_path: Path, superlink: SuperLink, pki: Pki
) -> None:
    data_dir = tmp_path / "dev-r"
    key = pki.enrolled_device(data_dir, "dev-r")
    old_id = superlink.register(public_key_file(key, tmp_path / "old.pub"), "dev-r-old")
    supervisor = SupernodeSupervisor(
        device_id="dev-r",
        data_dir=data_dir,
        supernode=flower_bin() / "flower-supernode",
        key_path=lambda: key,
        store_path=sample_store_path(data_dir),
        locate=lambda: FederationInfo(superlink.address, pki.ca_path.read_text()),
        backoff=Backoff(key_check_s=1.0),
    )
    supervisor.start()
    try:
        wait_until(lambda: supervisor.status.node_id == old_id, ONLINE_TIMEOUT, "joined with the first key")
        renewed = ec.generate_private_key(ec.SECP256R1())  # a renewal with a new key replaces device.key
        key.write_bytes(_pem(renewed))
        new_id = superlink.register(public_key_file(key, tmp_path / "new.pub"), "dev-r-new")
        wait_until(lambda: supervisor.status.node_id == new_id, ONLINE_TIMEOUT, "joined with the new key")
        written = serialization.load_ssh_private_key(supervisor.key_path.read_bytes(), password=None)
        assert isinstance(written, ec.EllipticCurvePrivateKey)
        assert written.public_key().public_numbers() == renewed.public_key().public_numbers()
        assert supervisor.status.restarts == 1
    finally:
        supervisor.stop()


# -- locating the SuperLink and Flower ---------------------------------------------------------------------


class _CoordinatorStub:
    """`GET /api/v1/enrolment/federation` answering what the test sets (status, body)."""

    def __init__(self) -> None:
        self.answer: tuple[int, dict[str, Any]] = (503, {"detail": "starting"})
        self.requests = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                stub.requests += 1
                status, body = stub.answer if self.path == "/api/v1/enrolment/federation" else (404, {})
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *_: Any) -> None:
                pass

        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def coordinator() -> Iterator[_CoordinatorStub]:
    stub = _CoordinatorStub()
    yield stub
    stub.close()


@pytest.mark.timeout(300)
def test_the_superlink_is_asked_from_the_coordinator_until_it_answers(
    tmp_path: Path, superlink: SuperLink, pki: Pki, coordinator: _CoordinatorStub
) -> None:
    data_dir = tmp_path / "dev-c"
    key = pki.enrolled_device(data_dir, "dev-c")
    node_id = superlink.register(public_key_file(key, tmp_path / "dev-c.pub"), "dev-c")
    config = federated_config(data_dir, "dev-c", superlink, pki, superlink=None, superlink_root_certificates=None)
    agent = Agent(config.model_copy(update={"coordinator_url": coordinator.url}))
    agent.start()
    try:
        wait_until(lambda: coordinator.requests >= 2, 20, "asked again after a failure")
        waiting = agent.federation_status
        assert waiting.state == "waiting-for-superlink" and "503" in waiting.last_error
        coordinator.answer = (200, {"superlink": superlink.address, "root_certificates": pki.ca_path.read_text()})
        wait_until(lambda: agent.federation_status.node_id == node_id, ONLINE_TIMEOUT, "joined the named SuperLink")
    finally:
        agent.stop()


def test_a_coordinator_without_federated_learning_is_a_404(coordinator: _CoordinatorStub) -> None:
    from agent.federation import FederationUnavailableError

    coordinator.answer = (404, {"detail": "federated learning is not enabled on this coordinator"})
    with pytest.raises(FederationUnavailableError, match="federated learning off"):
        fetch_federation(coordinator.url)
    coordinator.answer = (200, {"superlink": "https://nope", "root_certificates": ""})
    with pytest.raises(Exception, match="not a SuperLink location"):
        fetch_federation(coordinator.url)


def test_federated_without_flower_or_identity_is_a_config_error(
    tmp_path: Path, pki: Pki, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "no-flower"
    empty.mkdir()
    settings: dict[str, Any] = {
        "device_id": "dev-x",
        "data_dir": tmp_path / "data",
        "mqtt_url": f"mqtt://127.0.0.1:{free_port()}",
        "http_port": None,
        "federated": True,
        "superlink": "127.0.0.1:9",
        "superlink_root_certificates": pki.ca_path,
    }
    with pytest.raises(ConfigError, match=f"flower_bin_dir is {empty}, which has no executable flower-supernode"):
        Agent(AgentConfig(**settings, flower_bin_dir=empty)).start()
    with pytest.raises(ConfigError, match="EDGEFLEET_FLOWER_BIN_DIR is"):
        locate_supernode(None, {"EDGEFLEET_FLOWER_BIN_DIR": str(empty)})
    monkeypatch.setattr(sys, "prefix", str(tmp_path / "venv"))  # no sibling .venv-flower
    with pytest.raises(ConfigError, match="no flower-supernode was found: set flower_bin_dir"):
        locate_supernode(None, {"PATH": str(empty)})
    monkeypatch.undo()
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "flower-supernode").write_text("#!/bin/sh\n")
    (fake_bin / "flower-supernode").chmod(0o755)
    with pytest.raises(ConfigError, match="needs an enrolled device"):
        Agent(AgentConfig(**settings, flower_bin_dir=fake_bin)).start()


def test_superlink_settings_come_together_and_name_host_and_port(tmp_path: Path) -> None:
    base = {"device_id": "d1", "data_dir": tmp_path, "mqtt_url": "mqtt://h:1"}
    with pytest.raises(ValueError, match="set superlink and superlink_root_certificates together"):
        AgentConfig(**base, superlink="h:9092")
    with pytest.raises(ValueError, match="is not host:port"):
        AgentConfig(**base, superlink="https://h:9092", superlink_root_certificates=tmp_path / "ca.pem")
    config = AgentConfig(**base, superlink="[::1]:9092", superlink_root_certificates=tmp_path / "ca.pem")
    assert config.superlink == "[::1]:9092" and not config.federated


def test_refusals_are_told_apart_from_other_exits() -> None:
    refused = "ERROR: Exit Code: 305\nFailed to initialize the connection to the SuperLink.\n[code: 2004] Failed"
    assert classify_exit(1, refused) == "refused"
    assert classify_exit(1, "Exit Code: 305\n[code: 2001] SuperNode authentication is enabled.") == "refused"
    assert classify_exit(1, "Exit Code: 302\nUnable to parse the private key file") == "failed"
    assert classify_exit(137, "") == "failed"


def test_node_config_quotes_the_store_path_as_toml() -> None:
    assert node_config(Path('/data/a "b"/s.sqlite3'), "cam-1") == (
        'sample-store="/data/a \\"b\\"/s.sqlite3" device-id="cam-1"'
    )


def test_federated_settings_come_from_the_file_with_paths_relative_to_it(tmp_path: Path) -> None:
    (tmp_path / "agent.toml").write_text(
        'device_id = "d1"\nmqtt_url = "mqtt://h:1883"\ndata_dir = "data"\nfederated = true\n'
        'superlink = "superlink.example:9092"\nsuperlink_root_certificates = "pki/ca.pem"\nflower_bin_dir = "flower"\n'
    )
    config = load_config(tmp_path / "agent.toml", env={"EDGEFLEET_AGENT_FEDERATED": "false"})
    assert not config.federated and config.superlink == "superlink.example:9092"
    assert config.superlink_root_certificates == (tmp_path / "pki" / "ca.pem").resolve()
    assert config.flower_bin_dir == (tmp_path / "flower").resolve()
