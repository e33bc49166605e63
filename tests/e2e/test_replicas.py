"""Three coordinator replicas on one PostgreSQL and one Mosquitto act as one, and survive the SIGKILL of one of them.

Real parts throughout: `edgefleet up --replicated` three times (one data directory, as a shared volume would give
them: the fleet CA, the artifacts, the admin token), a fresh PostgreSQL database, Mosquitto with the fleet's mTLS,
and real agents reaching the API and the artifacts through a TCP load balancer in front of the replicas (what an
operator puts there; the artifact URLs devices are given point at it).

Each replica speaks to the broker under a certificate of its own (CN `edgefleet:coordinator.<replica>`), which the
Mosquitto configuration of `edgefleet broker mosquitto-config --replica NAME` lists: unchanged, that configuration
makes each CN a client id, so replicas sharing the coordinator's one certificate would take each other's session.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import ssl
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest

from cloud.broker_rights import replica_identity
from cloud.client import ApiClient
from cloud.pki import FleetPki
from protocol.identity import COORDINATOR_IDENTITY, COORDINATOR_OU, certificate_identity
from protocol.topics import Topics
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet, drive_inference
from simulators.brokers import MosquittoProcess, fleet_broker, mosquitto_binary
from tests.e2e.clients import coordinator_tls, mqtt_session, tls_for
from tests.e2e.test_rollouts import GROUP, NO_GATES, Api, wait_until
from tests.services import free_port, fresh_postgres_database, unavailable

pytestmark = pytest.mark.e2e

REPLICAS = 3
REPLICA_NAMES = tuple(f"replica-{index}" for index in range(REPLICAS))  # stable: the broker's ACL lists each
DEVICES = 12


class LoadBalancer:
    """A TCP load balancer on a free loopback port: each connection to the next replica that accepts one."""

    def __init__(self, ports: list[int]) -> None:
        self.ports = ports
        self._next = 0
        self._server = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._server.getsockname()[1]}"
        self._closing = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        self._closing = True
        self._server.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _backend(self) -> socket.socket | None:
        for _ in self.ports:
            port = self.ports[self._next % len(self.ports)]
            self._next += 1
            with contextlib.suppress(OSError):
                return socket.create_connection(("127.0.0.1", port), timeout=2)
        return None

    def _serve(self, client: socket.socket) -> None:
        backend = self._backend()
        if backend is None:
            client.close()
            return
        backend.settimeout(None)
        with client, backend, selectors.DefaultSelector() as selector:
            selector.register(client, selectors.EVENT_READ, backend)
            selector.register(backend, selectors.EVENT_READ, client)
            while True:
                for key, _ in selector.select(timeout=60):
                    try:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)
                    except OSError:
                        return


class Replicas:
    """`edgefleet up --replicated` N times on one data directory, database and broker."""

    def __init__(self, root: Path, database_url: str, topic_base: str, broker_log: Path) -> None:
        self.root = root
        self.broker_log = broker_log
        self.database_url = database_url
        self.topic_base = topic_base
        self.ports = [free_port() for _ in range(REPLICAS)]
        self.balancer = LoadBalancer(self.ports)
        self.processes: dict[str, CoordinatorProcess] = {}

    def start(self, mqtt_url: str, broker_args: tuple[str, ...]) -> ApiClient:
        client: ApiClient | None = None
        for name, port in zip(REPLICA_NAMES, self.ports, strict=True):
            args = (*broker_args, "--replicated", "--replica", name, "--port", str(port))
            process = CoordinatorProcess(
                self.root / "coordinator",
                mqtt_url=mqtt_url,
                database_url=self.database_url,
                topic_base=self.topic_base,
                extra_args=args,
                env={
                    "EDGEFLEET_PUBLIC_URL": self.balancer.url,
                    "EDGEFLEET_ROLLOUT_TICK_S": "0.2",
                    "EDGEFLEET_LEASE_TTL_S": "2",
                },
            )
            client = process.start()  # one at a time: the first makes the fleet CA, the token and the schema
            self.processes[name] = process
            wait_until(lambda port=port: _healthy(port), 30, f"{name} to answer on its own port")
        assert client is not None
        return client

    def direct(self, name: str, token: str) -> ApiClient:
        """A client of one replica, bypassing the load balancer."""
        return ApiClient(f"http://127.0.0.1:{self.ports[int(name.rsplit('-', 1)[1])]}", token)

    def lease_holder(self, lease: str) -> str | None:
        with psycopg.connect(self.database_url.replace("+psycopg", "")) as conn:
            row = conn.execute("SELECT holder FROM lease WHERE name = %s", (lease,)).fetchone()
        return None if row is None else str(row[0])

    def stop(self) -> None:
        for process in self.processes.values():
            process.stop()
        self.balancer.close()


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=2).status_code == 200
    except httpx.HTTPError:
        return False


@contextlib.contextmanager
def replicas_mosquitto(
    workdir: Path, data_dir: Path, topic_base: str, names: tuple[str, ...] = REPLICA_NAMES
) -> Iterator[MosquittoProcess]:
    """The fleet Mosquitto exactly as `edgefleet broker mosquitto-config --replica NAME ...` writes it.

    Its `use_username_as_clientid` makes a certificate's CN the client id: each replica connects with a certificate
    of its own (`edgefleet:coordinator.<replica>`), so none takes another's session over, and the ACL lists each.
    """
    if mosquitto_binary() is None:
        unavailable("Mosquitto is not installed (apt-get install mosquitto); MQTT end-to-end tests need it")
    broker = MosquittoProcess(workdir, data_dir, topic_base, replicas=names)
    assert "use_username_as_clientid true" in (workdir / "mosquitto.conf").read_text()
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


def replica_tls(data_dir: Path, name: str) -> ssl.SSLContext:
    """TLS presenting replica `name`'s own certificate (issued in the shared PKI as its first start would)."""
    pki = FleetPki(data_dir / "pki")
    return tls_for(pki.ca_path, *pki.replica_files(name))


def test_replicas_on_the_fleet_mosquitto_keep_their_sessions_side_by_side(tmp_path: Path, topic_base: str) -> None:
    data_dir, desired = tmp_path / "coordinator", Topics(topic_base).desired("cam-1")
    with replicas_mosquitto(tmp_path / "broker", data_dir, topic_base, ("replica-a", "replica-b")) as broker:
        # The same client id asked for by both: Mosquitto replaces it with each certificate's CN.
        with (
            mqtt_session(
                broker.url, "edgefleet-coordinator", replica_tls(data_dir, "replica-a"), subscribe=(f"{topic_base}/#",)
            ) as first,
            mqtt_session(broker.url, "edgefleet-coordinator", replica_tls(data_dir, "replica-b")) as second,
        ):
            assert first.refused is None and second.refused is None, (first.refused, second.refused)
            second.client.publish(desired, b"generation-1", qos=1).wait_for_publish(5)
            wait_until(lambda: desired in first.topics(), 10, "replica-a to receive what replica-b published")
            assert not first.disconnected.is_set() and not second.disconnected.is_set(), "a replica was kicked off"
        # What replicas sharing the coordinator's one certificate got: the second connect takes the first's session.
        with (
            mqtt_session(broker.url, "one", coordinator_tls(data_dir)) as first,
            mqtt_session(broker.url, "two", coordinator_tls(data_dir)),
        ):
            assert first.disconnected.wait(10), "one certificate, two connections: the broker kept both"


def test_replica_missing_from_the_brokers_acl_connects_but_reads_and_writes_nothing(
    tmp_path: Path, topic_base: str
) -> None:
    data_dir, topics = tmp_path / "coordinator", Topics(topic_base)
    everything = (f"{topic_base}/#",)
    with (
        replicas_mosquitto(tmp_path / "broker", data_dir, topic_base, ("listed",)) as broker,
        mqtt_session(broker.url, "a", replica_tls(data_dir, "listed"), subscribe=everything) as listed,
        mqtt_session(broker.url, "b", replica_tls(data_dir, "stray"), subscribe=everything) as stray,
    ):
        assert stray.refused is None, "a certificate of the fleet CA connects"
        stray.client.publish(topics.desired("cam-1"), b"forged", qos=1).wait_for_publish(5)
        listed.client.publish(topics.desired("cam-2"), b"real", qos=1).wait_for_publish(5)
        wait_until(lambda: topics.desired("cam-2") in listed.topics(), 10, "the listed replica to get its publish")
        time.sleep(0.5)  # time for the stray's copy to arrive, if the ACL let it through
    assert stray.topics() == [], "a replica the ACL does not list read the fleet's messages"
    assert topics.desired("cam-1") not in listed.topics(), "a replica the ACL does not list published"


def test_replica_certificate_speaks_for_the_coordinator_on_the_embedded_broker(tmp_path: Path, topic_base: str) -> None:
    data_dir, desired = tmp_path / "coordinator", Topics(topic_base).desired("cam-1")
    with (
        fleet_broker("amqtt", tmp_path / "broker", data_dir, topic_base) as broker,
        mqtt_session(broker.url, "r-a", replica_tls(data_dir, "replica-a"), subscribe=(f"{topic_base}/#",)) as first,
        mqtt_session(broker.url, "r-b", replica_tls(data_dir, "replica-b")) as second,
    ):
        assert first.refused is None and second.refused is None, (first.refused, second.refused)
        second.client.publish(desired, b"generation-1", qos=1).wait_for_publish(5)
        wait_until(lambda: desired in first.topics(), 10, "replica-a to receive what replica-b published")


@pytest.fixture
def replicas(tmp_path: Path, topic_base: str) -> Iterator[tuple[Replicas, ApiClient]]:
    data_dir = tmp_path / "coordinator"
    with (
        replicas_mosquitto(tmp_path / "broker", data_dir, topic_base) as broker,
        fresh_postgres_database() as database,
    ):
        group = Replicas(tmp_path, database, topic_base, broker.log)
        try:
            client = group.start(broker.url, broker.coordinator_args)
            yield group, client
        finally:
            group.stop()


def inference_counts(client: ApiClient) -> dict[str, int]:
    return {d["device_id"]: d["inference_count"] for d in client.fleet_summary()["devices"]}


def test_replica_holding_a_rollout_sigkilled_mid_rollout_another_finishes_it_and_no_window_is_lost(
    replicas: tuple[Replicas, ApiClient], tmp_path: Path, digits_model_path: Path, digits_model_bytes: bytes
) -> None:
    group, client = replicas
    client.push_model(digits_model_path, name="digits", version="1.0")
    config = FleetConfig(
        devices=DEVICES,
        data_root=tmp_path / "fleet",
        coordinator_url=group.balancer.url,
        api_token=client.token,
        topic_base=group.topic_base,
        id_prefix="rep",
        tags=GROUP,
        http=True,
        telemetry_interval_s=3600,  # windows closed by flush_telemetry only: exact counts to compare
    )
    with SimulatedFleet(config) as fleet:
        wait_until(lambda: {d["id"] for d in client.devices()} >= set(fleet.device_ids), 30, "devices to enrol")
        client.deploy(model="digits", version="1.0", tags=GROUP)
        assert fleet.wait_for_version("1.0", 60), "the fleet did not converge on 1.0"
        before = drive_inference(fleet.agents, 3)

        path = tmp_path / "digits-2.onnx"
        path.write_bytes(digits_model_bytes)
        client.push_model(path, name="digits", version="2.0")
        api = Api(client)
        rollout = api.create(
            waves=[{"count": 3, "bake_seconds": 1}, {"percent": 100, "bake_seconds": 0}],
            gates=NO_GATES,
            max_concurrent_downloads=2,
        )
        lease = f"rollout:{rollout['id']}"
        wait_until(lambda: sum(api.dispatches(rollout["id"]).values()) >= 2, 30, "the first dispatches")
        holder = group.lease_holder(lease)
        assert holder in group.processes, holder
        fleet.flush_telemetry()  # windows in flight while the holder dies
        group.processes[holder].kill()
        during = drive_inference(fleet.agents, 3)
        fleet.flush_telemetry()
        updated_at_kill = len(fleet.running("2.0"))

        wait_until(lambda: api.status(rollout["id"]) == "completed", 60, "another replica to finish the rollout")
        assert updated_at_kill < DEVICES, "the kill came too late to prove anything"
        assert group.lease_holder(lease) not in {holder, None}, "the lease went to a surviving replica"
        assert fleet.wait_for_version("2.0", 30)
        decisions = api.rollout(rollout["id"])["decisions"]
        updated = Counter(d["figures"]["device_id"] for d in decisions if d["kind"] == "device_updated")
        assert updated == dict.fromkeys(fleet.device_ids, 1), "each device installed 2.0 once, none skipped"
        # A download the dead replica was serving is a failed attempt, retried by design; the takeover adds none.
        retries = Counter(d["figures"]["device_id"] for d in decisions if d["kind"] == "retry_scheduled")
        expected_dispatches = {device_id: 1 + retries[device_id] for device_id in fleet.device_ids}
        assert api.dispatches(rollout["id"]) == expected_dispatches

        # Telemetry: what the dead replica took and never acknowledged comes again from the agents' outboxes
        # (their resend timer, 30 s, brought forward), and the database stores each (device, seq) once.
        expected = {t.device_id: t.sent for t in before}
        for t in during:
            expected[t.device_id] += t.sent
        survivors = [group.direct(name, client.token or "") for name in group.processes if name != holder]
        deadline = time.monotonic() + 30
        while any(inference_counts(replica) != expected for replica in survivors):
            assert time.monotonic() < deadline, f"telemetry {inference_counts(survivors[0])} != {expected}"
            for agent in fleet.agents:
                agent._telemetry.resend()  # type: ignore[union-attr]
            time.sleep(0.5)
        assert all(inference_counts(replica) == expected for replica in survivors), "replicas agree"
        assert all(not agent._telemetry.unconfirmed for agent in fleet.agents)  # type: ignore[union-attr]

    # Each replica spoke to the broker under a certificate of its own, so none ever took another's session over.
    issued = tmp_path / "coordinator" / "pki" / "coordinators"
    for name in REPLICA_NAMES:
        assert certificate_identity((issued / f"{name}.crt").read_bytes()) == (replica_identity(name), COORDINATOR_OU)
    takeovers = [
        line
        for line in group.broker_log.read_text().splitlines()
        if "already connected" in line and COORDINATOR_IDENTITY in line
    ]
    assert not takeovers, takeovers
