"""Restarts strand no device and lose nothing: the embedded broker keeps its port and its memory, status stays honest.

Real parts throughout: `edgefleet up` in a process of its own with its embedded broker (SIGKILLed, as a crash
would), real agents, and the embedded broker alone (`python -m cloud.broker`) for the message-level checks.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from cloud.client import ApiClient
from cloud.pki import FleetPki
from protocol.mqtt import parse_mqtt_url
from protocol.topics import Topics
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet, drive_inference
from tests.e2e.clients import Session, mqtt_session, tls_for
from tests.e2e.test_fleet_deploy import deployment_statuses, wait_until
from tests.services import free_port

pytestmark = pytest.mark.e2e

# After the kill the agents' paho backoff (1 s doubling, up to 60 s) keeps running while the coordinator starts
# again (a few seconds here): they are back within a couple of backoff steps of the broker listening.
RECONNECT_BOUND_S = 30.0


@contextmanager
def occupied_port(port: int = 0) -> Iterator[int]:
    """Something else listening on 127.0.0.1:`port` (0: a free one) for the duration."""
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # the port may have connections in TIME_WAIT
        sock.bind(("127.0.0.1", port))
        sock.listen()
        yield int(sock.getsockname()[1])


def embedded_coordinator(root: Path, topic_base: str, broker_port: int) -> CoordinatorProcess:
    """`edgefleet up` on its embedded broker, asking for `broker_port` (0: any free port).

    Its HTTP port is chosen once, as a real coordinator's is: devices enrolled with that URL keep using it.
    """
    settings = root / "coordinator.toml"
    settings.write_text(f"embedded_broker_port = {broker_port}\n")
    args = ("--config", str(settings), "--port", str(free_port()))
    return CoordinatorProcess(root / "coordinator", topic_base=topic_base, extra_args=args)


def broker_url(process: CoordinatorProcess) -> str:
    """The broker URL the running coordinator tells devices."""
    return str(json.loads((process.data_dir / "coordinator.json").read_text())["mqtt_url"])


def fleet_of(client: ApiClient, topic_base: str, root: Path, devices: int, prefix: str, http: bool) -> SimulatedFleet:
    """Real agents enrolled with `client`'s coordinator (they learn the broker's URL at enrolment)."""
    config = FleetConfig(
        devices=devices,
        data_root=root,
        coordinator_url=client.url,
        api_token=client.token,
        topic_base=topic_base,
        id_prefix=prefix,
        http=http,
        telemetry_interval_s=3600,
    )
    return SimulatedFleet(config)


def statuses(client: ApiClient) -> dict[str, str]:
    return {d["id"]: d["status"] for d in client.devices()}


def test_embedded_broker_comes_back_on_the_same_port_after_a_sigkill(
    tmp_path: Path, topic_base: str, digits_model_path: Path
) -> None:
    with occupied_port() as busy:
        process = embedded_coordinator(tmp_path, topic_base, busy)
        client = process.start()
        try:
            url = broker_url(process)
            assert parse_mqtt_url(url).port != busy, "the requested port is taken: the broker fell back to a free one"
            with fleet_of(client, topic_base, tmp_path / "fleet", 3, "crash", http=True) as fleet:
                wait_until(lambda: set(statuses(client).values()) == {"online"}, 30, "the fleet online")

                process.kill()
                killed = time.monotonic()
                client = process.start()
                assert broker_url(process) == url, "the restarted broker must listen where the devices look for it"
                wait_until(
                    lambda: all(a._transport is not None and a._transport.connected for a in fleet.agents),
                    RECONNECT_BOUND_S,
                    "every agent to reconnect to the same URL",
                )
                reconnect_s = time.monotonic() - killed
                assert reconnect_s < RECONNECT_BOUND_S
                wait_until(lambda: set(statuses(client).values()) == {"online"}, 15, "the fleet online again")

                client.push_model(digits_model_path, name="digits", version="1.0.0")
                deployment = client.deploy(model="digits", version="1.0.0", tags={"fleet": "crash"})
                wait_until(
                    lambda: set(deployment_statuses(client, deployment["id"]).values()) == {"succeeded"},
                    60,
                    "a deployment through the restarted broker",
                )
                traffic = drive_inference(fleet.agents, 5)
                fleet.flush_telemetry()
                expected = {t.device_id: t.sent for t in traffic}
                wait_until(
                    lambda: (
                        {d["device_id"]: d["inference_count"] for d in client.fleet_summary()["devices"]} == expected
                    ),
                    30,
                    f"telemetry {expected} through the restarted broker",
                )
        finally:
            process.stop()


def test_restart_refuses_when_the_kept_broker_port_is_taken(tmp_path: Path, topic_base: str) -> None:
    process = embedded_coordinator(tmp_path, topic_base, 0)
    process.start()
    kept = parse_mqtt_url(broker_url(process)).port
    assert process.stop() == 0
    assert json.loads((process.data_dir / "broker.json").read_text())["port"] == kept

    with occupied_port(kept):
        done = subprocess.run(
            process.command(),
            env={"EDGEFLEET_CONFIG": str(tmp_path / "cli.toml"), "PATH": str(Path(sys.executable).parent)},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert done.returncode != 0
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert f"127.0.0.1:{kept}" in errors[0] and str(process.data_dir / "broker.json") in errors[0]
    assert "embedded_broker_port" in errors[0] and "Traceback" not in done.stderr


@contextmanager
def broker_process(pki: Path, state: Path, port: int, topic_base: str) -> Iterator[subprocess.Popen[bytes]]:
    """The embedded fleet broker in a process of its own, keeping its state in `state`; killed afterwards."""
    command = [
        sys.executable, "-m", "cloud.broker", "--host", "127.0.0.1", "--port", str(port), "--pki-dir", str(pki),
        "--topic-base", topic_base, "--state-dir", str(state),
    ]  # fmt: skip
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline().decode().strip()  # the URL, once it listens
        assert line == f"mqtts://127.0.0.1:{port}", line
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


def device_certificate(pki: FleetPki, device_id: str, directory: Path) -> tuple[Path, Path]:
    """A fleet certificate for `device_id` (key made here, CSR signed by the fleet CA)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    issued = pki.issue_device_certificate(device_id, csr.public_bytes(serialization.Encoding.PEM).decode(), days=1)
    cert_path, key_path = directory / f"{device_id}.crt", directory / f"{device_id}.key"
    cert_path.write_text(issued.pem)
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_path, key_path


def received(session: Session, count: int, what: str, timeout: float = 10.0) -> list[tuple[str, bytes, bool]]:
    wait_until(lambda: len(session.messages) >= count, timeout, what)
    return session.messages


def test_retained_desired_and_queued_messages_survive_a_broker_kill(tmp_path: Path, topic_base: str) -> None:
    pki = FleetPki(tmp_path / "pki").ensure()
    device_tls = tls_for(pki.ca_path, *device_certificate(pki, "dev-1", tmp_path))
    other_tls = tls_for(pki.ca_path, *device_certificate(pki, "dev-2", tmp_path))
    coordinator_tls = tls_for(pki.ca_path, *pki.coordinator_files())
    topics, port, state = Topics(topic_base), free_port(), tmp_path / "state"
    url = f"mqtts://127.0.0.1:{port}"
    desired, telemetry = topics.desired("dev-1"), topics.telemetry("dev-2")

    with broker_process(pki.directory, state, port, topic_base) as broker:
        # Two persistent sessions go offline: a device waiting for its desired state, a coordinator for telemetry.
        with mqtt_session(url, "dev-1", device_tls, subscribe=(desired,), clean_session=False) as device:
            assert device.refused is None and device.granted == [1]
        with mqtt_session(url, "bridge", coordinator_tls, subscribe=(telemetry,), clean_session=False) as bridge:
            assert bridge.refused is None and bridge.granted == [1]
        # Each message is acknowledged (PUBACK) by the broker before it is killed.
        with mqtt_session(url, "coordinator-api", coordinator_tls) as publisher:
            publisher.client.publish(desired, b'{"generation": 1}', qos=1, retain=True).wait_for_publish(5)
        with mqtt_session(url, "dev-2", other_tls) as sender:
            sender.client.publish(telemetry, b'{"seq": 1}', qos=1).wait_for_publish(5)
        broker.send_signal(signal.SIGKILL)
        broker.wait(10)

    with broker_process(pki.directory, state, port, topic_base):
        # While dev-1 is still away, one more: routed to the restored session under its restored identity.
        with mqtt_session(url, "coordinator-api", coordinator_tls) as publisher:
            publisher.client.publish(desired, b'{"generation": 2}', qos=1, retain=True).wait_for_publish(5)
        with mqtt_session(url, "dev-1", device_tls, clean_session=False) as device:
            messages = received(device, 2, "dev-1's queued desired states")
            assert [(t, p) for t, p, _ in messages[:2]] == [
                (desired, b'{"generation": 1}'),
                (desired, b'{"generation": 2}'),
            ]
            assert messages[0][2], "a message kept across the restart arrives with the RETAIN flag (not live)"
        with mqtt_session(url, "bridge", coordinator_tls, clean_session=False) as bridge:
            assert received(bridge, 1, "the telemetry sent while the bridge was away")[0][:2] == (
                telemetry,
                b'{"seq": 1}',
            )
        with mqtt_session(url, "late-reader", coordinator_tls, subscribe=(desired,)) as late:
            assert received(late, 1, "the retained desired state")[0] == (desired, b'{"generation": 2}', True)


def test_device_status_after_a_coordinator_crash_is_unknown_until_heard_from(tmp_path: Path, topic_base: str) -> None:
    process = embedded_coordinator(tmp_path, topic_base, 0)
    client = process.start()
    try:
        with fleet_of(client, topic_base, tmp_path / "fleet", 2, "st", http=False) as fleet:
            gone = fleet.agents[1]
            alive_id, gone_id = fleet.device_ids
            wait_until(lambda: set(statuses(client).values()) == {"online"}, 30, "both devices online")
            last_seen = client.device(gone_id)["last_seen"]

            process.kill()  # the broker dies with it: no last will will ever say that `gone` went away
            gone.stop()
            client = process.start()
            assert statuses(client)[gone_id] == "unknown"

            wait_until(lambda: statuses(client)[alive_id] == "online", RECONNECT_BOUND_S, "the running agent heard")
            time.sleep(1.0)  # the bridge has had the broker's replay of gone's retained `online` report by now
            device = client.device(gone_id)
            assert (device["status"], device["last_seen"]) == ("unknown", last_seen)
            summary = client.fleet_summary()
            assert (summary["online_count"], summary["unknown_count"], summary["device_count"]) == (1, 1, 2)
            shown = subprocess.run(
                [str(Path(sys.executable).parent / "edgefleet"), "fleet", "summary", "--url", client.url],
                env={"EDGEFLEET_TOKEN": client.token, "COLUMNS": "200", "EDGEFLEET_CONFIG": str(tmp_path / "none")},
                capture_output=True,
                text=True,
                timeout=60,
                check=True,
            )
            assert "1/2 online, 1 unknown" in shown.stdout

            gone.start()
            wait_until(lambda: statuses(client)[gone_id] == "online", RECONNECT_BOUND_S, "the device back and heard")
    finally:
        process.stop()
