"""An agent given several broker URLs fails over between them when the one it is connected to is SIGKILLed.

(a) Two independent fleet Mosquittos (mTLS, the same fleet CA): nothing bridges them, so the proof is at the
broker: after the first dies, the second hears the device's retained reported state and its unconfirmed telemetry,
and the device hears an acknowledgement published on the second. (a') The coordinator given both Mosquittos too:
its bridge follows the agent to the second, so a deployment made after the kill reaches the device and its
telemetry is stored. (b) A broker that is itself a cluster: three NATS
servers with JetStream and their MQTT gateway; the coordinator tells devices all three nodes at enrolment; the node
the whole fleet is on is SIGKILLed mid-rollout and mid-telemetry: the rollout completes, every telemetry window is
counted exactly once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent import Agent
from cloud.client import ApiClient
from protocol import DeviceStatus, ReportedState, TelemetryAck, TelemetryWindow, Topics, decode, encode
from protocol.mqtt import parse_mqtt_url
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet, drive_inference
from simulators.brokers import MosquittoProcess, NatsCluster, mosquitto_binary, nats_server_binary
from tests.e2e.clients import coordinator_tls, enrol_device, mqtt_session
from tests.e2e.test_fleet_deploy import deployment_statuses, wait_until
from tests.e2e.test_identity import agent_for
from tests.services import unavailable

pytestmark = pytest.mark.e2e

# The first reconnect after the kill waits paho's 1 s and goes where the connection was (refused at once), the
# next waits 2 s and goes to the next URL: about 3 s; room for a slow CI.
FAILOVER_BOUND_S = 30.0
# A NATS node's death also costs JetStream a new leader for the MQTT session stream: connects to the survivors
# wait ~4 s for it or are refused once, and the refused agents back off 4 s, then 8 s (11-23 s measured on 2 cores).
NATS_FAILOVER_BOUND_S = 60.0


def connected_to(agent: Agent, url: str) -> bool:
    """True while `agent` holds a connection to the broker at `url`."""
    transport = agent._transport
    address = parse_mqtt_url(url)
    return transport is not None and transport.connected and transport.address.port == address.port


@pytest.fixture
def two_mosquittos(tmp_path: Path, coordinator_data_dir: Path, topic_base: str) -> Iterator[list[MosquittoProcess]]:
    """Two fleet Mosquittos of one coordinator's fleet CA, each on its own port, not bridged."""
    if mosquitto_binary() is None:
        unavailable("Mosquitto is not installed (apt-get install mosquitto); the failover test needs two")
    brokers = [MosquittoProcess(tmp_path / f"mosquitto-{i}", coordinator_data_dir, topic_base) for i in range(2)]
    try:
        for broker in brokers:
            broker.start()
        yield brokers
    finally:
        for broker in brokers:
            broker.stop()


def test_agent_fails_over_to_the_second_broker_when_the_first_is_killed(
    two_mosquittos: list[MosquittoProcess],
    coordinator_data_dir: Path,
    topic_base: str,
    tmp_path: Path,
    digits_model_path: Path,
) -> None:
    first, second = two_mosquittos
    topics = Topics(topic_base)
    coordinator = CoordinatorProcess(
        coordinator_data_dir, mqtt_url=first.url, topic_base=topic_base, extra_args=first.coordinator_args
    )
    api = coordinator.start()
    try:
        identity = enrol_device(api, tmp_path / "devices", "roamer")
        agent = agent_for(identity, tmp_path, mqtt_url=f"{first.url},{second.url}")
        agent.start()
        try:
            wait_until(lambda: api.device("roamer")["status"] == "online", 30, "the agent online on the first broker")
            assert connected_to(agent, first.url)
            api.push_model(digits_model_path, name="digits", version="1.0.0")
            api.deploy(model="digits", version="1.0.0", device_ids=["roamer"])
            assert agent.wait_for_model("1.0.0", 60), "the model deployed through the first broker"

            observer_tls = coordinator_tls(coordinator_data_dir)
            watched = (topics.reported("roamer"), topics.telemetry("roamer"))
            with mqtt_session(second.url, "observer", observer_tls, subscribe=watched) as observer:
                assert observer.refused is None, observer.refused
                assert not observer.messages, "nothing bridges the brokers: the second has heard nothing of roamer"

                first.kill()
                killed = time.monotonic()
                traffic = drive_inference([agent], 3)  # counted in a window made while no broker is reachable
                agent.flush_telemetry()
                wait_until(lambda: connected_to(agent, second.url), FAILOVER_BOUND_S, "the agent on the second")
                failover_s = time.monotonic() - killed

                def heard(topic: str) -> list[bytes]:
                    return [payload for t, payload, _retained in list(observer.messages) if t == topic]

                wait_until(lambda: heard(topics.telemetry("roamer")), 30, "the unconfirmed window resent")
                windows = [decode(TelemetryWindow, payload) for payload in heard(topics.telemetry("roamer"))]
                assert sum(w.inference_count for w in windows) == traffic[0].sent
                wait_until(lambda: heard(topics.reported("roamer")), 10, "the reported state re-published")
                reported = decode(ReportedState, heard(topics.reported("roamer"))[-1])
                assert reported.status is DeviceStatus.ONLINE
                assert reported.active_model is not None and reported.active_model.version == "1.0.0"

                # The device subscribed again on the second broker: it hears an acknowledgement published there.
                newest = max(w.seq for w in windows)
                assert newest in agent.telemetry_unconfirmed
                ack = TelemetryAck(device_id="roamer", stored_seq=newest, max_seq=newest)
                observer.client.publish(topics.ack("roamer"), encode(ack), qos=1, retain=True).wait_for_publish(5)
                wait_until(lambda: agent.telemetry_unconfirmed == [], 15, "the outbox emptied by the second's ack")
            print(f"\nfailover to the second Mosquitto {failover_s:.2f}s after SIGKILL of the first")
            assert failover_s < FAILOVER_BOUND_S
        finally:
            agent.stop()
    finally:
        coordinator.stop()


def test_coordinator_and_agent_fail_over_together_and_a_later_deployment_arrives(
    two_mosquittos: list[MosquittoProcess],
    coordinator_data_dir: Path,
    topic_base: str,
    tmp_path: Path,
    digits_model_path: Path,
) -> None:
    first, second = two_mosquittos  # fleet Mosquittos (mTLS): the coordinator's bridge uses its client certificate
    both = f"{first.url},{second.url}"
    coordinator = CoordinatorProcess(
        coordinator_data_dir, mqtt_url=both, topic_base=topic_base, extra_args=first.coordinator_args
    )
    api = coordinator.start()
    try:
        assert api.info()["mqtt_url"] == both, "devices are told every broker"
        identity = enrol_device(api, tmp_path / "devices", "pair")
        assert identity.broker_url == both, "the enrolment answer hands the device the list"
        agent = agent_for(identity, tmp_path)  # the brokers as enrolment named them
        agent.start()
        try:
            wait_until(lambda: api.device("pair")["status"] == "online", 30, "the agent online on the first broker")
            assert connected_to(agent, first.url)
            api.push_model(digits_model_path, name="digits", version="1.0.0")

            connects = api.stats()["connects"]

            first.kill()
            killed = time.monotonic()
            wait_until(lambda: connected_to(agent, second.url), FAILOVER_BOUND_S, "the agent on the second")
            # With the first dead, a new connect of the bridge can only be to the second.
            wait_until(lambda: api.stats()["connects"] > connects, FAILOVER_BOUND_S, "the bridge on the second")
            failover_s = time.monotonic() - killed

            # Nothing bridges the brokers: the desired state can only reach the device through the second one.
            api.deploy(model="digits", version="1.0.0", device_ids=["pair"])
            assert agent.wait_for_model("1.0.0", 60), "the deployment made after the kill reached the agent"
            traffic = drive_inference([agent], 3)
            agent.flush_telemetry()
            wait_until(lambda: inference_counts(api).get("pair") == traffic[0].sent, 30, "the agent's telemetry stored")
            print(f"\ncoordinator and agent on the second Mosquitto {failover_s:.2f}s after SIGKILL of the first")
        finally:
            agent.stop()
    finally:
        coordinator.stop()


def inference_counts(api: ApiClient) -> dict[str, int]:
    return {d["device_id"]: d["inference_count"] for d in api.fleet_summary()["devices"]}


@pytest.fixture
def nats_cluster(tmp_path: Path) -> Iterator[NatsCluster]:
    """Three NATS servers (JetStream, MQTT gateway) clustered on loopback ports."""
    if nats_server_binary() is None:
        unavailable("nats-server is not installed (https://nats.io); the NATS cluster failover test needs it")
    with NatsCluster(tmp_path / "nats") as cluster:
        yield cluster


def test_fleet_on_a_nats_cluster_survives_the_kill_of_its_node_mid_rollout(
    nats_cluster: NatsCluster, tmp_path: Path, topic_base: str, digits_model_path: Path
) -> None:
    urls = nats_cluster.urls
    # The coordinator is on the last node; devices learn all three at enrolment and start on the first.
    process = CoordinatorProcess(
        tmp_path / "coordinator",
        mqtt_url=urls[2],
        topic_base=topic_base,
        env={"EDGEFLEET_DEVICE_MQTT_URL": ",".join(urls)},
    )
    api = process.start()
    try:
        config = FleetConfig(
            devices=6,
            data_root=tmp_path / "fleet",
            coordinator_url=api.url,
            api_token=api.token,
            topic_base=topic_base,
            id_prefix="nats",
            http=False,
            telemetry_interval_s=3600,
        )
        with SimulatedFleet(config) as fleet:
            wait_until(lambda: {d["status"] for d in api.devices()} == {"online"}, 30, "the fleet online")
            assert all(connected_to(agent, urls[0]) for agent in fleet.agents)

            api.push_model(digits_model_path, name="digits", version="1.0.0")
            deployment = api.deploy(model="digits", version="1.0.0", tags={"fleet": "nats"})
            wait_until(lambda: fleet.running("1.0.0"), 60, "the first device updated")
            before = drive_inference(fleet.running("1.0.0"), 4)
            fleet.flush_telemetry()

            assert set(deployment_statuses(api, deployment["id"]).values()) != {"succeeded"}, "still rolling out"
            nats_cluster.kill(0)  # mid-rollout (updated devices are on trial for commit_after_s), windows in flight
            killed = time.monotonic()
            wait_until(
                lambda: all(connected_to(agent, urls[1]) for agent in fleet.agents),
                NATS_FAILOVER_BOUND_S,
                "every agent on the next node",
            )
            failover_s = time.monotonic() - killed
            wait_until(
                lambda: set(deployment_statuses(api, deployment["id"]).values()) == {"succeeded"},
                90,
                "the rollout completed through the surviving nodes",
            )
            after = drive_inference(fleet.agents, 3)
            fleet.flush_telemetry()
            expected = {agent.config.device_id: 0 for agent in fleet.agents}
            for traffic in (*before, *after):
                expected[traffic.device_id] += traffic.sent
            wait_until(lambda: inference_counts(api) == expected, 60, f"telemetry {expected} counted exactly once")
            time.sleep(2)  # a duplicate delivered late would show now
            assert inference_counts(api) == expected
            print(f"\nall {len(fleet.agents)} agents on the next NATS node {failover_s:.2f}s after SIGKILL of theirs")
    finally:
        assert process.stop() == 0
