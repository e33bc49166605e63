"""Device identity on the broker, attacked the way an outsider or a hostile enrolled device would (both brokers).

Only enrolled identities speak; each device only on its own topics; nobody takes over another's session; a
revoked device is refused at its next connect; desired states come from the coordinator alone.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest

from agent import Agent, AgentConfig
from agent.errors import ConfigError
from agent.identity import DeviceIdentity, load_identity, needs_renewal, renew
from cloud.client import ApiClient
from protocol import DesiredState, Topics, encode
from tests.e2e.clients import device_tls, enrol_device, mqtt_session, tls_for
from tests.e2e.test_fleet_deploy import wait_until
from tests.services import FleetBroker

pytestmark = pytest.mark.e2e


def agent_for(identity: DeviceIdentity, root: Path, **overrides: object) -> Agent:
    """A real agent running with an enrolled identity."""
    config = AgentConfig(
        device_id=identity.device_id,
        data_dir=identity.directory.parent,
        coordinator_url=identity.coordinator_url,
        http_port=None,
        telemetry_interval_s=3600,
        reconnect_min_s=1,
        reconnect_max_s=2,
        **overrides,  # type: ignore[arg-type]
    )
    return Agent(config)


@pytest.fixture
def victim(coordinator: ApiClient, tmp_path: Path) -> Iterator[Agent]:
    """An enrolled device, running: the one attackers go after."""
    identity = enrol_device(coordinator, tmp_path / "devices", "victim", {"site": "lab"})
    agent = agent_for(identity, tmp_path)
    agent.start()
    wait_until(lambda: coordinator.device("victim")["status"] == "online", 30, "the victim to come online")
    try:
        yield agent
    finally:
        agent.stop()


def test_anonymous_client_is_refused(coordinator: ApiClient, broker_url: str, coordinator_data_dir: Path) -> None:
    with mqtt_session(broker_url, "anon", tls_for(coordinator_data_dir / "pki" / "ca.crt")) as anonymous:
        assert anonymous.refused is not None, "a client without a certificate got in"


def test_client_with_a_certificate_of_another_ca_is_refused(
    coordinator: ApiClient, broker_url: str, coordinator_data_dir: Path, tmp_path: Path
) -> None:
    from cloud.pki import FleetPki

    rogue = FleetPki(tmp_path / "rogue-pki").ensure()  # a CA of its own, issuing itself a "coordinator" identity
    cert, key = rogue.coordinator_files()
    tls = tls_for(coordinator_data_dir / "pki" / "ca.crt", cert, key)
    with mqtt_session(broker_url, "rogue", tls) as session:
        assert session.refused is not None, "a certificate of a foreign CA was accepted"


def test_device_publishing_on_another_devices_topics_is_refused(
    coordinator: ApiClient, victim: Agent, broker_url: str, topic_base: str, tmp_path: Path
) -> None:
    topics = Topics(topic_base)
    mallory = enrol_device(coordinator, tmp_path / "devices", "mallory")
    before = coordinator.device("victim")
    forged = (
        b'{"schema_version": 1, "device_id": "victim", "seq": 9999, "window_start": "2026-01-01T00:00:00Z",'
        b' "window_end": "2026-01-01T00:00:10Z", "inference_count": 1000, "error_count": 1000}'
    )
    reported = b'{"schema_version": 1, "device_id": "victim", "status": "offline"}'
    with mqtt_session(broker_url, "mallory", device_tls(mallory)) as attacker:
        assert attacker.refused is None, attacker.refused
        attacker.client.publish(topics.telemetry("victim"), forged, qos=1).wait_for_publish(10)
        attacker.client.publish(topics.reported("victim"), reported, qos=1, retain=True).wait_for_publish(10)
        time.sleep(1.0)
    after = coordinator.device("victim")
    assert after["status"] == "online", "a forged 'offline' from another device was believed"
    assert after["error_count"] == before["error_count"] == 0
    assert all(w["seq"] != 9999 for w in coordinator.telemetry("victim"))


def test_device_subscribing_to_another_devices_desired_gets_nothing(
    coordinator: ApiClient, victim: Agent, broker_url: str, topic_base: str, tmp_path: Path, digits_model_path: Path
) -> None:
    topics = Topics(topic_base)
    mallory = enrol_device(coordinator, tmp_path / "devices", "mallory")
    coordinator.push_model(digits_model_path, name="digits", version="1.0.0")
    with mqtt_session(
        broker_url, "mallory", device_tls(mallory), subscribe=(topics.desired("victim"), f"{topic_base}/#")
    ) as spy:
        assert spy.refused is None, spy.refused
        coordinator.deploy(model="digits", version="1.0.0", device_ids=["victim"])
        assert victim.wait_for_model("1.0.0", 60), "the victim never got its desired state"
        time.sleep(0.5)
    assert spy.topics() == [], f"mallory read {spy.topics()}"


def test_client_id_takeover_is_impossible(
    coordinator: ApiClient, victim: Agent, fleet_broker: FleetBroker, tmp_path: Path
) -> None:
    mallory = enrol_device(coordinator, tmp_path / "devices", "mallory")
    with mqtt_session(fleet_broker.url, "victim", device_tls(mallory), clean_session=False) as attacker:
        time.sleep(1.5)
        # amqtt refuses a device certificate with another client id; Mosquitto makes the certificate's name the
        # client id (use_username_as_clientid), so mallory only ever gets mallory's own session.
        assert attacker.refused is not None or fleet_broker.kind == "mosquitto"
        assert victim._transport is not None and victim._transport.connected, "the victim was kicked off"
    assert coordinator.device("victim")["status"] == "online"


def test_forged_desired_from_a_device_never_reaches_an_agent(
    coordinator: ApiClient, victim: Agent, broker_url: str, topic_base: str, tmp_path: Path
) -> None:
    topics = Topics(topic_base)
    mallory = enrol_device(coordinator, tmp_path / "devices", "mallory")
    forged = DesiredState(device_id="victim", generation=100, model=None)
    will = (topics.desired("victim"), encode(forged))  # a last will is published later by the broker itself
    with mqtt_session(broker_url, "mallory", device_tls(mallory), will=will) as attacker:
        if attacker.refused is None:
            attacker.client.publish(topics.desired("victim"), encode(forged), qos=1, retain=True).wait_for_publish(10)
            attacker.client.publish(topics.desired("mallory"), encode(forged), qos=1, retain=True).wait_for_publish(10)
            sock = attacker.client.socket()
            if sock is not None:
                sock.close()  # die without DISCONNECT: the broker would publish the will
        time.sleep(1.5)
    assert victim.rejected_messages == 0, "a forged desired state reached the victim"
    status = victim.update_status
    assert status is None or status.generation < 100


def test_revoked_device_is_refused_at_its_next_connect_and_ignored(
    coordinator: ApiClient, broker_url: str, topic_base: str, tmp_path: Path
) -> None:
    identity = enrol_device(coordinator, tmp_path / "devices", "doomed")
    with mqtt_session(broker_url, "doomed", device_tls(identity)) as before:
        assert before.refused is None, before.refused
    revoked = coordinator.post_json("/devices/doomed/revoke", {})
    assert revoked["enrolment"] == "revoked"
    with mqtt_session(broker_url, "doomed", device_tls(identity)) as after:
        assert after.refused is not None, "a revoked certificate was accepted"
    events = [e for e in coordinator.get("/devices/doomed/events")["data"] if e["kind"] == "device.revoked"]
    assert events, "the revocation is not in the device's event log"


def test_reported_tags_from_a_device_are_ignored(coordinator: ApiClient, tmp_path: Path) -> None:
    identity = enrol_device(coordinator, tmp_path / "devices", "tagged", {"site": "lab", "ring": "main"})
    agent = agent_for(identity, tmp_path, tags={"site": "evil", "ring": "canary"})
    agent.start()
    try:
        wait_until(lambda: coordinator.device("tagged")["status"] == "online", 30, "the device to come online")
        assert coordinator.device("tagged")["tags"] == {"site": "lab", "ring": "main"}
    finally:
        agent.stop()


def test_certificate_is_renewed_before_expiry_without_enrolling_again(coordinator: ApiClient, tmp_path: Path) -> None:
    identity = enrol_device(coordinator, tmp_path / "devices", "renewer")
    first = identity.certificate()
    assert not needs_renewal(first)
    assert needs_renewal(first, first.not_valid_after_utc - timedelta(days=1)), "due in its last third"
    renewed = renew(identity)
    assert renewed.certificate().serial_number != first.serial_number
    assert renewed.certificate().public_key() == first.public_key(), "the key never changes hands"
    loaded = load_identity(identity.directory.parent)
    assert loaded is not None and loaded.certificate().serial_number == renewed.certificate().serial_number
    agent = agent_for(renewed, tmp_path)
    agent.start()
    try:
        wait_until(lambda: coordinator.device("renewer")["status"] == "online", 30, "the renewed device to connect")
    finally:
        agent.stop()


def test_revoked_device_cannot_renew(coordinator: ApiClient, tmp_path: Path) -> None:
    identity = enrol_device(coordinator, tmp_path / "devices", "gone")
    coordinator.post_json("/devices/gone/revoke", {})
    with pytest.raises(ConfigError, match="revoked"):
        renew(identity)


@pytest.fixture
def short_certificates(monkeypatch: pytest.MonkeyPatch) -> None:
    """Device certificates of 86 s (plus the 5 min back-dating): always in their last third, always due."""
    monkeypatch.setenv("EDGEFLEET_DEVICE_CERTIFICATE_DAYS", "0.001")


def test_running_agent_renews_its_certificate_before_it_expires(
    short_certificates: None, coordinator: ApiClient, tmp_path: Path
) -> None:
    identity = enrol_device(coordinator, tmp_path / "devices", "ageing")
    enrolled = identity.certificate().serial_number
    agent = agent_for(identity, tmp_path, certificate_check_s=0.5)
    agent.start()
    try:
        started_with = agent.certificate_serial
        assert started_with != enrolled, "a certificate in its last third is renewed at start"
        wait_until(lambda: agent.certificate_serial not in (enrolled, started_with), 30, "a renewal while running")
        wait_until(lambda: coordinator.device("ageing")["status"] == "online", 30, "the device to stay online")
        kinds = [e["kind"] for e in coordinator.get("/devices/ageing/events")["data"]]
        assert kinds.count("device.certificate_renewed") >= 2
    finally:
        agent.stop()
