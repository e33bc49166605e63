"""SuperNode identities: an enrolled device's key is registered with the SuperLink and a real `flower-supernode` holding
that key joins; a key nobody registered is refused; revocation kicks the node off for good; a device enrolled before
federated learning was switched on, or renewed with a new key, is brought in line.

The coordinator runs in-process (`create_app` with `federated=True`) with a real `flower-superlink` of the Flower
venv; devices enrol through the real route with a key and CSR made here, as the agent makes them.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from fastapi.testclient import TestClient
from sqlmodel import Session, col, select

from cloud.app import create_app
from cloud.coordinator import Coordinator
from cloud.db import create_db_engine, init_db
from cloud.federation.flower import FlowerError, flower_env
from cloud.federation.nodes import NodeAction, NodeReconciler, NodeRow, eligible_node_ids, plan_nodes
from cloud.models import AuditEntry, Device, DeviceCertificate, EnrolmentState, FlowerNode
from cloud.pki import FleetPki, pem_public_key
from cloud.settings import Settings
from tests.cloud.test_superlink import family, flower_bin, kill_all, openssh_public, wait_until

pytestmark = pytest.mark.timeout(300)

ONLINE_WITHIN_S = 90.0  # a SuperNode starts and activates in a few seconds; room for a loaded machine


# -- the plan (pure) --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("keys", "rows", "flower", "expected"),
    [
        ({"a": "K1"}, {}, None, [("register", "a", "")]),
        ({"a": "K1"}, {"a": NodeRow("7", "K1", True)}, None, []),
        ({"a": "K1"}, {"a": NodeRow("7", "K1", True)}, {"7": "online"}, []),
        ({}, {"a": NodeRow("7", "K1", True)}, None, [("unregister", "a", "7")]),
        ({}, {"a": NodeRow("7", "K1", False)}, None, []),
        ({"a": "K2"}, {"a": NodeRow("7", "K1", True)}, None, [("replace", "a", "7")]),
        ({"a": "K1"}, {"a": NodeRow("7", "K1", False)}, None, []),  # a refused key is not tried again
        ({"a": "K2"}, {"a": NodeRow("7", "K1", False)}, None, [("register", "a", "")]),  # enrolled again
        ({"a": "K1"}, {"a": NodeRow("7", "K1", True)}, {}, [("register", "a", "")]),  # SuperLink lost it
        ({"a": "K1"}, {"a": NodeRow("7", "K1", True)}, {"7": "unregistered"}, [("forget", "a", "7")]),
        ({"a": None}, {}, None, []),  # no key known: nothing to register
    ],
    ids=[
        "new device",
        "registered",
        "registered and listed",
        "revoked",
        "revoked and unregistered",
        "renewed with a new key",
        "unregistered key",
        "enrolled again",
        "superlink lost its database",
        "unregistered behind our back",
        "no certificate copy",
    ],
)
def test_plan_brings_the_superlink_in_line_with_the_fleet(
    keys: dict[str, str | None],
    rows: dict[str, NodeRow],
    flower: dict[str, str] | None,
    expected: list[tuple[str, str, str]],
) -> None:
    actions = plan_nodes(keys, rows, flower)
    assert [(a.kind, a.device_id, a.node_id) for a in actions] == expected
    assert all(a.public_key == keys["a"] for a in actions if a.kind in ("register", "replace"))


def test_plan_unregisters_before_it_registers() -> None:
    actions = plan_nodes({"b": "KB"}, {"a": NodeRow("1", "KA", True)})
    assert actions == [
        NodeAction("unregister", "a", "1", reason="device no longer enrolled"),
        NodeAction("register", "b", public_key="KB", reason="enrolled"),
    ]


# -- a coordinator with a SuperLink, in-process -----------------------------------------------------------------


class Fleet:
    """The coordinator app and what a test does as an operator and as devices."""

    def __init__(self, client: TestClient, root: Path) -> None:
        self.client = client
        self.root = root
        self.coordinator: Coordinator = client.app.state.coordinator  # type: ignore[attr-defined]
        client.headers["Authorization"] = f"Bearer {self.coordinator.admin_token}"

    def enrol(self, device_id: str, key: ec.EllipticCurvePrivateKey | None = None) -> ec.EllipticCurvePrivateKey:
        """Enrol `device_id` with a fresh P-256 key (as the agent makes it) through the real routes."""
        token = self.client.post(f"/api/v1/devices/{device_id}/enrolment-token", json={}).json()["token"]
        key = key or ec.generate_private_key(ec.SECP256R1())
        response = self.client.post(
            "/api/v1/enrolment", json={"device_id": device_id, "csr_pem": csr(device_id, key), "token": token}
        )
        assert response.status_code == 200, response.text
        return key

    def node(self, device_id: str) -> FlowerNode | None:
        with Session(self.coordinator.engine) as session:
            return session.get(FlowerNode, device_id)

    def live_node_id(self, device_id: str) -> str | None:
        with Session(self.coordinator.engine) as session:
            return eligible_node_ids(session, [device_id]).get(device_id)

    def statuses(self) -> dict[str, str]:
        """node id → status, as the SuperLink lists them."""
        assert self.coordinator.flower is not None
        return {str(n["node-id"]): str(n["status"]) for n in self.coordinator.flower.nodes()}

    def location(self) -> dict[str, str]:
        response = self.client.get("/api/v1/enrolment/federation")
        assert response.status_code == 200, response.text
        return dict(response.json())

    def audit_actions(self, device_id: str) -> list[str]:
        with Session(self.coordinator.engine) as session:
            entries = session.exec(
                select(AuditEntry).where(AuditEntry.subject == device_id).order_by(col(AuditEntry.seq))
            )
            return [e.action for e in entries if e.action.startswith("flower_node.")]


def csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    request = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return request.public_bytes(serialization.Encoding.PEM).decode()


def settings_for(root: Path, *, federated: bool, **more: Any) -> Settings:
    return Settings(
        data_dir=root / "coordinator",
        port=8080,
        device_mqtt_url="mqtts://broker.test:8883",  # no broker runs here; enrolment answers still name one
        federated=federated,
        superlink_port=0,
        flower_node_tick_s=1.0,
        rollout_tick_s=0,
        governance_tick_s=0,
        **more,
    )


@contextlib.contextmanager
def running(root: Path, *, federated: bool = True, **more: Any) -> Iterator[Fleet]:
    """The coordinator app (and with `federated`, its SuperLink) until the block ends; no Flower process outlives it."""
    app = create_app(settings_for(root, federated=federated, **more), enable_mqtt=False)
    seen: set[int] = set()
    with TestClient(app) as client:
        fleet = Fleet(client, root)
        superlink = fleet.coordinator.federation.superlink if fleet.coordinator.federation else None
        if superlink is not None:
            assert superlink.wait_ready(60), "the SuperLink did not come up"
            assert superlink.pid is not None
            seen = family(superlink.pid)
        try:
            yield fleet
        finally:
            if superlink is not None and superlink.pid is not None:
                seen |= family(superlink.pid)
    kill_all(seen)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    flower_bin()
    with running(tmp_path) as running_fleet:
        yield running_fleet


# -- a device's SuperNode ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def supernode(
    root: Path, key: ec.EllipticCurvePrivateKey, location: dict[str, str]
) -> Iterator[subprocess.Popen[bytes]]:
    """A real `flower-supernode` authenticating with `key` (OpenSSH form) and trusting the route's CA, as a device
    runs it; stopped (and everything it started) afterwards."""
    bin_dir = flower_bin()
    root.mkdir(parents=True, exist_ok=True)
    key_file = root / "supernode.key"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption())
    )
    os.chmod(key_file, 0o600)
    ca = root / "superlink-ca.pem"
    ca.write_text(location["root_certificates"])
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [
        str(bin_dir / "flower-supernode"),
        "--superlink", location["superlink"],
        "--root-certificates", str(ca),
        "--auth-supernode-private-key", str(key_file),
        "--port", str(port),
    ]  # fmt: skip
    with (root / "supernode.log").open("wb") as log:
        proc = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=flower_env(root / "home", bin_dir),
            start_new_session=True,
        )
    seen = family(proc.pid)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            seen |= family(proc.pid)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        kill_all(seen)


def log_of(root: Path) -> str:
    return (root / "supernode.log").read_text(errors="replace")


# -- scenarios ---------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_enrolled_device_is_registered_and_its_supernode_joins(fleet: Fleet, tmp_path: Path) -> None:
    key = fleet.enrol("cam-1")
    wait_until(lambda: fleet.live_node_id("cam-1"), 30, "cam-1's key to be registered")
    node_id = fleet.live_node_id("cam-1")
    assert node_id is not None
    row = fleet.node("cam-1")
    assert row is not None and row.public_key == openssh_public(key)
    assert fleet.statuses()[node_id] == "registered"
    assert fleet.audit_actions("cam-1") == ["flower_node.registered"]

    with supernode(tmp_path / "cam-1", key, fleet.location()) as proc:
        wait_until(lambda: fleet.statuses().get(node_id) == "online", ONLINE_WITHIN_S, "cam-1's SuperNode online", 2)
        assert proc.poll() is None
    assert fleet.coordinator.federation is not None
    assert fleet.coordinator.federation.nodes.reconcile() == [], "a second pass changed something"


@pytest.mark.slow
def test_supernode_with_a_key_nobody_registered_is_refused(fleet: Fleet, tmp_path: Path) -> None:
    stranger = ec.generate_private_key(ec.SECP256R1())
    with supernode(tmp_path / "stranger", stranger, fleet.location()) as proc:
        wait_until(lambda: proc.poll() is not None, ONLINE_WITHIN_S, "the stranger's SuperNode to give up", 1)
        assert proc.returncode != 0
        assert "Failed to activate SuperNode" in log_of(tmp_path / "stranger")
    assert fleet.statuses() == {}


@pytest.mark.slow
def test_revoked_device_is_kicked_off_and_stays_out(fleet: Fleet, tmp_path: Path) -> None:
    key = fleet.enrol("cam-2")
    wait_until(lambda: fleet.live_node_id("cam-2"), 30, "cam-2's key to be registered")
    node_id = fleet.live_node_id("cam-2")
    assert node_id is not None
    with supernode(tmp_path / "cam-2", key, fleet.location()) as proc:
        wait_until(lambda: fleet.statuses().get(node_id) == "online", ONLINE_WITHIN_S, "cam-2's SuperNode online", 2)

        assert fleet.client.post("/api/v1/devices/cam-2/revoke").status_code == 200
        wait_until(lambda: fleet.live_node_id("cam-2") is None, 30, "cam-2's node to be unregistered")
        wait_until(lambda: proc.poll() is not None, ONLINE_WITHIN_S, "cam-2's SuperNode to be kicked off", 1)
    row = fleet.node("cam-2")
    assert row is not None and row.unregistered_at is not None and row.node_id == node_id
    assert fleet.statuses() == {node_id: "unregistered"}
    assert fleet.audit_actions("cam-2") == ["flower_node.registered", "flower_node.unregistered"]

    assert fleet.coordinator.federation is not None
    assert fleet.coordinator.federation.nodes.reconcile() == []
    with supernode(tmp_path / "cam-2-again", key, fleet.location()) as again:
        wait_until(lambda: again.poll() is not None, ONLINE_WITHIN_S, "the revoked key's SuperNode to give up", 1)
    assert fleet.statuses() == {node_id: "unregistered"}


@pytest.mark.slow
def test_renewal_with_a_new_key_replaces_the_node(fleet: Fleet) -> None:
    fleet.enrol("cam-3")
    wait_until(lambda: fleet.live_node_id("cam-3"), 30, "cam-3's key to be registered")
    old = fleet.live_node_id("cam-3")
    new_key = ec.generate_private_key(ec.SECP256R1())
    request = csr("cam-3", new_key)
    pki = fleet.coordinator.fleet_pki()
    issued = pki.issue_device_certificate("cam-3", request, days=90)  # as a renewal with a new key would
    with Session(fleet.coordinator.engine) as session:
        digest = hashlib.sha256(pem_public_key(request)).hexdigest()
        session.add(DeviceCertificate(device_id="cam-3", serial=issued.serial, public_key_sha256=digest,
                                      not_after=issued.not_after))  # fmt: skip
        session.commit()
    assert fleet.coordinator.federation is not None
    fleet.coordinator.federation.nudge()
    wait_until(lambda: fleet.live_node_id("cam-3") not in (None, old), 30, "cam-3's new key to be registered")
    row = fleet.node("cam-3")
    assert row is not None and row.public_key == openssh_public(new_key)
    assert fleet.statuses()[str(old)] == "unregistered"


@pytest.mark.slow
def test_key_registered_before_the_coordinator_recorded_it_is_recovered(fleet: Fleet) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    assert fleet.coordinator.flower is not None
    node_id = fleet.coordinator.flower.register_node(openssh_public(key), name="cam-4")  # then "the coordinator died"
    fleet.enrol("cam-4", key)
    wait_until(lambda: fleet.live_node_id("cam-4"), 30, "cam-4's registration to be recovered")
    assert fleet.live_node_id("cam-4") == node_id


@pytest.mark.slow
def test_device_enrolled_before_federated_learning_is_registered_at_start(tmp_path: Path) -> None:
    flower_bin()
    with running(tmp_path, federated=False) as plain:
        key = plain.enrol("old-timer")
        assert plain.coordinator.federation is None and plain.node("old-timer") is None
    with running(tmp_path) as fleet:
        wait_until(lambda: fleet.live_node_id("old-timer"), 30, "old-timer's key to be registered at start")
        row = fleet.node("old-timer")
        assert row is not None and row.public_key == openssh_public(key)


@pytest.mark.slow
def test_eligible_node_ids_are_live_registrations_of_enrolled_devices(fleet: Fleet) -> None:
    fleet.enrol("a")
    fleet.enrol("b")
    wait_until(lambda: len(fleet.statuses()) == 2, 30, "both keys to be registered")
    assert fleet.client.post("/api/v1/devices/b/revoke").status_code == 200
    with Session(fleet.coordinator.engine) as session:
        found = eligible_node_ids(session, ["a", "b", "ghost"])
    assert set(found) == {"a"} and found["a"] == fleet.live_node_id("a")


# -- failures (a stand-in SuperLink: what is tested is the reconciler's retry logic) ------------------------------


class RefusingControl:
    """A `FlowerControl` stand-in whose SuperLink refuses every registration until told otherwise."""

    def __init__(self) -> None:
        self.refuse = True
        self.attempts = 0

    def nodes(self) -> list[dict[str, object]]:
        return []

    def register_node(self, public_key_openssh: str, *, name: str) -> str:
        self.attempts += 1
        if self.refuse:
            raise FlowerError("register failed: [code: 99] refused", code=99)
        return "42"


def test_failing_registration_is_retried_after_growing_pauses_not_every_tick(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    engine = create_db_engine(f"sqlite:///{tmp_path / 'edgefleet.db'}")
    init_db(engine)
    pki = FleetPki(tmp_path / "pki").ensure()
    key = ec.generate_private_key(ec.SECP256R1())
    request = csr("cam-9", key)
    issued = pki.issue_device_certificate("cam-9", request, days=90)
    with Session(engine) as session:
        session.add(Device(id="cam-9", enrolment=EnrolmentState.ENROLLED.value))
        digest = hashlib.sha256(pem_public_key(request)).hexdigest()
        session.add(DeviceCertificate(device_id="cam-9", serial=issued.serial, public_key_sha256=digest,
                                      not_after=issued.not_after))  # fmt: skip
        session.commit()
    control = RefusingControl()
    reconciler = NodeReconciler(engine=engine, pki=pki, control=control, tick_s=0.5)  # type: ignore[arg-type]

    for _ in range(3):
        reconciler.run_guarded()
    assert control.attempts == 1, "a refused registration was retried before its pause ended"
    assert [r.message for r in caplog.records].count("cannot register the SuperNode of device cam-9: "
                                                     "register failed: [code: 99] refused") == 1  # fmt: skip
    time.sleep(0.6)
    reconciler.run_guarded()
    assert control.attempts == 2
    control.refuse = False
    time.sleep(1.1)  # the second failure doubled the pause
    reconciler.run_guarded()
    with Session(engine) as session:
        assert eligible_node_ids(session, ["cam-9"]) == {"cam-9": "42"}
    engine.dispose()


@pytest.mark.slow
def test_coordinator_with_an_external_superlink_registers_its_devices_there(fleet: Fleet, tmp_path: Path) -> None:
    """The SuperLink of `fleet` plays the external one: the second coordinator starts none and uses it."""
    external = fleet.location()
    ca_file = tmp_path / "external-ca.pem"
    ca_file.write_text(external["root_certificates"])
    with running(tmp_path / "second", superlink_url=external["superlink"], superlink_ca_file=ca_file) as second:
        assert second.coordinator.federation is not None and second.coordinator.federation.superlink is None
        assert second.location() == external
        second.enrol("far-1")
        wait_until(lambda: second.live_node_id("far-1"), 30, "far-1's key to be registered on the external SuperLink")
        assert fleet.statuses() == {second.live_node_id("far-1"): "registered"}
