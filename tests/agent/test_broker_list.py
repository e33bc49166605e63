"""Several broker URLs: how they are configured, parsed, and tried in turn (failover, then rediscovery).

The failover order is checked on the transport's own decision, with paho's client standing in as a recorder of
where the next attempt goes, and against a real Mosquitto that refuses; tests/e2e/test_broker_failover.py kills real
brokers.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from agent import AgentConfig, ConfigError, load_config
from agent.transport import MqttTransport
from protocol.errors import BrokerUrlError
from protocol.mqtt import BrokerAddress, parse_mqtt_urls
from tests.services import run_mosquitto

A, B, C = (BrokerAddress("127.0.0.1", port) for port in (1883, 1884, 1885))


def test_comma_separated_urls_in_the_environment_are_tried_in_order(tmp_path: Path) -> None:
    env = {
        "EDGEFLEET_AGENT_DEVICE_ID": "d1",
        "EDGEFLEET_AGENT_DATA_DIR": str(tmp_path),
        "EDGEFLEET_AGENT_MQTT_URL": "mqtt://127.0.0.1:1883, mqtt://127.0.0.1:1884/",
    }
    config = load_config(None, env)
    assert config.mqtt_url == "mqtt://127.0.0.1:1883,mqtt://127.0.0.1:1884"
    assert parse_mqtt_urls(config.mqtt_url) == (A, B)


def test_a_toml_list_of_urls_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text(
        'device_id = "d1"\ndata_dir = "data"\nmqtt_url = ["mqtt://127.0.0.1:1883", "mqtt://127.0.0.1:1885"]\n'
    )
    assert parse_mqtt_urls(load_config(path, {}).mqtt_url or "") == (A, C)


def test_one_url_still_reads_as_before(tmp_path: Path) -> None:
    config = AgentConfig(device_id="d1", data_dir=tmp_path, mqtt_url="mqtts://broker.example")
    assert parse_mqtt_urls(config.mqtt_url or "") == (BrokerAddress("broker.example", 8883, tls=True),)


def test_a_list_entry_that_is_not_a_url_names_it(tmp_path: Path) -> None:
    path = tmp_path / "agent.toml"
    path.write_text('device_id = "d1"\ndata_dir = "data"\nmqtt_url = "mqtt://127.0.0.1:1883,broker-2:1883"\n')
    with pytest.raises(ConfigError, match="'broker-2:1883' is not a URL"):
        load_config(path, {})


def test_a_list_mixing_tls_and_plain_tcp_is_refused() -> None:
    with pytest.raises(BrokerUrlError, match="mix TLS"):
        parse_mqtt_urls("mqtts://a:8883,mqtt://user:secret@b:1883")
    with pytest.raises(BrokerUrlError, match=r"user:\*\*\*@b"):  # the password is not repeated in the message
        parse_mqtt_urls("mqtts://a:8883,mqtt://user:secret@b:1883")


class _NextAttempt:
    """Stands in for paho's client: records where `connect_async` points the next attempt."""

    def __init__(self) -> None:
        self.targets: list[tuple[str, int]] = []
        self.credentials: list[tuple[str | None, str | None]] = []

    def connect_async(self, host: str, port: int, **_: Any) -> None:
        self.targets.append((host, port))

    def username_pw_set(self, username: str | None, password: str | None = None) -> None:
        self.credentials.append((username, password))


def transport(addresses: list[BrokerAddress], **options: Any) -> MqttTransport:
    return MqttTransport(addresses=addresses, client_id="c", subscriptions=[], will=("t", b""), **options)


def fail(mqtt: MqttTransport, client: _NextAttempt, times: int) -> None:
    for _ in range(times):
        mqtt._handle_connect_fail(client, None)  # type: ignore[arg-type]


def test_each_failed_connect_moves_to_the_next_broker_round_robin() -> None:
    mqtt, client = transport([A, B, C]), _NextAttempt()
    fail(mqtt, client, 4)
    assert client.targets == [(B.host, B.port), (C.host, C.port), (A.host, A.port), (B.host, B.port)]
    assert mqtt.address == B


def test_each_broker_is_given_its_own_credentials() -> None:
    first, second = BrokerAddress("a", 1883, username="u1", password="p1"), BrokerAddress("b", 1883, username="u2")
    mqtt, client = transport([first, second]), _NextAttempt()
    fail(mqtt, client, 2)
    assert client.credentials == [("u2", None), ("u1", "p1")]


def test_a_single_broker_is_retried_where_it_is() -> None:
    mqtt, client = transport([A]), _NextAttempt()
    fail(mqtt, client, 3)
    assert client.targets == [] and mqtt.address == A


def test_rediscovery_comes_after_every_broker_failed_rediscover_after_times() -> None:
    asked: list[int] = []
    moved = [BrokerAddress("10.0.0.9", 1883), BrokerAddress("10.0.0.10", 1883)]

    def rediscover() -> list[BrokerAddress]:
        asked.append(1)
        return moved

    mqtt, client = transport([A, B], rediscover=rediscover, rediscover_after=2), _NextAttempt()
    fail(mqtt, client, 3)
    assert not asked, "two brokers, two attempts each: not yet"
    fail(mqtt, client, 1)
    assert asked == [1]
    assert mqtt.addresses == tuple(moved) and mqtt.address == moved[0]
    assert client.targets[-1] == ("10.0.0.9", 1883)


def test_rediscovery_naming_the_same_brokers_keeps_failing_over() -> None:
    mqtt, client = transport([A, B], rediscover=lambda: [A, B], rediscover_after=1), _NextAttempt()
    fail(mqtt, client, 3)
    assert mqtt.addresses == (A, B)
    assert client.targets == [(B.host, B.port), (A.host, A.port), (B.host, B.port)]


def test_a_broker_refusing_the_connection_is_failed_over_like_an_unreachable_one() -> None:
    mqtt, client = transport([A, B]), _NextAttempt()
    refused = SimpleNamespace(is_failure=True)
    mqtt._handle_connect(client, None, SimpleNamespace(session_present=False), refused, None)  # type: ignore[arg-type]
    assert client.targets == [(B.host, B.port)] and mqtt.address == B
    assert not mqtt.connected


def test_agent_refused_by_its_first_broker_connects_to_the_second(tmp_path: Path, mosquitto_url: str) -> None:
    """A real Mosquitto answering CONNACK "not authorized" (a node whose credentials or ACLs are not the fleet's yet):
    paho alone would retry it forever; the transport moves on to the next broker."""
    with run_mosquitto(tmp_path / "refusing", anonymous=False) as refusing:
        addresses = parse_mqtt_urls(f"{refusing},{mosquitto_url}")
        topic = f"t{uuid.uuid4().hex[:10]}/will"
        mqtt = MqttTransport(
            addresses=addresses,
            client_id=f"c-{uuid.uuid4().hex[:8]}",
            subscriptions=[],
            will=(topic, b""),
            reconnect_min_s=1,
            reconnect_max_s=1,
        )
        mqtt.start(on_message=lambda _topic, _payload: None, on_connect=lambda: None)
        try:
            assert mqtt.wait_connected(30), "never connected to the second broker"
            assert mqtt.address == addresses[1]
        finally:
            mqtt.close(timeout=1)
