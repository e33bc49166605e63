"""Devices join the fleet's SuperLink with the key they enrolled with, end to end: `edgefleet up --federated` as a
process, devices enrolled by the agent's own code, their SuperNodes real `flower-supernode` processes.

A device enrolled before federated learning was switched on joins once it is; one enrolled afterwards joins within
seconds; a revoked one is kicked off while the others stay; the coordinator leaves no Flower process behind.
"""

from __future__ import annotations

import sqlite3
from contextlib import ExitStack
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from agent.identity import DeviceIdentity
from cloud.client import ApiClient
from simulators import CoordinatorProcess
from tests.cloud.test_flower_nodes import ONLINE_WITHIN_S, supernode
from tests.cloud.test_superlink import control_for, family, flower_bin, flower_processes, kill_all, wait_until
from tests.e2e.clients import enrol_device

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(400)]


def live_nodes(data_dir: Path) -> dict[str, str]:
    """Device → node id of the live registrations the coordinator recorded (read from its SQLite database)."""
    with sqlite3.connect(data_dir / "edgefleet.db") as db:
        rows = db.execute("SELECT device_id, node_id FROM flower_node WHERE unregistered_at IS NULL").fetchall()
    return {str(device): str(node) for device, node in rows}


def device_key(identity: DeviceIdentity) -> ec.EllipticCurvePrivateKey:
    """The key the agent made at enrolment (its SuperNode presents it in OpenSSH form)."""
    key = serialization.load_pem_private_key(identity.key_path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def test_enrolled_devices_join_the_superlink_and_a_revoked_one_is_kicked_off(tmp_path: Path) -> None:
    flower_bin()
    data_dir = tmp_path / "coordinator"
    plain = CoordinatorProcess(data_dir)
    early = enrol_device(plain.start(), tmp_path / "devices", "early")
    assert plain.stop() == 0

    federated = CoordinatorProcess(data_dir, federated=True)
    api: ApiClient = federated.start()
    assert federated.proc is not None
    seen = family(federated.proc.pid)
    try:
        wait_until(lambda: "early" in live_nodes(data_dir), 60, "the device enrolled earlier to be registered")
        late = enrol_device(api, tmp_path / "devices", "late")
        wait_until(lambda: "late" in live_nodes(data_dir), 30, "the device enrolled now to be registered")
        nodes = live_nodes(data_dir)

        location = dict(api.get("/enrolment/federation"))
        control = control_for(location, tmp_path / "operator")

        def status(device: str) -> str | None:
            return {str(n["node-id"]): str(n["status"]) for n in control.nodes()}.get(nodes[device])

        with ExitStack() as devices:
            procs = {
                identity.device_id: devices.enter_context(
                    supernode(tmp_path / "supernodes" / identity.device_id, device_key(identity), location)
                )
                for identity in (early, late)
            }
            wait_until(
                lambda: status("early") == status("late") == "online", ONLINE_WITHIN_S, "both SuperNodes online", 2
            )
            seen |= family(federated.proc.pid)

            api.post_json("/devices/late/revoke", {})
            wait_until(lambda: procs["late"].poll() is not None, ONLINE_WITHIN_S, "the revoked SuperNode kicked off", 1)
            assert status("late") == "unregistered"
            assert status("early") == "online" and procs["early"].poll() is None
            assert live_nodes(data_dir) == {"early": nodes["early"]}

        assert federated.stop() == 0
        wait_until(lambda: not flower_processes(seen), 30, "every Flower process of the coordinator to stop")
    finally:
        federated.stop()
        kill_all(seen)
