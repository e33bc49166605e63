"""The embedded amqtt broker keeps the MQTT promises the fleet depends on: retained messages, QoS 1, wills."""

from __future__ import annotations

import socket

import pytest

from cloud.broker import EmbeddedBroker
from tests.cloud.mqtt_helpers import connected_client, host_port, new_client, publish


def test_retained_message_published_before_subscriber_connects_is_delivered(amqtt_url: str, topic_base: str) -> None:
    topic = f"{topic_base}/devices/d1/desired"
    with connected_client(amqtt_url) as (publisher, _):
        publish(publisher, topic, b"generation-1", retain=True)
    with connected_client(amqtt_url, f"{topic_base}/devices/+/desired") as (_, received):
        message = received.wait_for(lambda m: m.topic == topic)
    assert message.payload == b"generation-1"
    assert message.retain


def test_last_will_is_published_when_a_client_dies(amqtt_url: str, topic_base: str) -> None:
    will_topic = f"{topic_base}/devices/d2/reported"
    with connected_client(amqtt_url, will_topic) as (_, received):
        dying = new_client()
        dying.will_set(will_topic, b'{"status":"offline"}', qos=1, retain=True)
        host, port = host_port(amqtt_url)
        dying.connect(host, port, keepalive=30)
        dying.loop(timeout=1.0)  # CONNECT sent and CONNACK read
        sock = dying.socket()
        assert sock is not None
        sock.close()  # dies without DISCONNECT, as a device losing power does
        message = received.wait_for(lambda m: m.topic == will_topic)
    assert message.payload == b'{"status":"offline"}'


def test_qos1_messages_arrive_in_order_without_loss(amqtt_url: str, topic_base: str) -> None:
    topic = f"{topic_base}/devices/d3/telemetry"
    with connected_client(amqtt_url, topic) as (client, received):
        for i in range(50):
            publish(client, topic, str(i).encode())
        received.wait_for(lambda m: m.payload == b"49")
    assert [int(m.payload) for m in received.messages] == list(range(50))


def test_busy_port_falls_back_to_a_free_port() -> None:
    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        busy = occupant.getsockname()[1]
        broker = EmbeddedBroker("127.0.0.1", busy, allow_anonymous=True)
        broker.start()
        try:
            assert broker.port != busy
            assert broker.url == f"mqtt://127.0.0.1:{broker.port}"
            with socket.create_connection(("127.0.0.1", broker.port), timeout=2):
                pass
        finally:
            broker.stop()


def test_busy_port_without_fallback_fails_with_a_clear_error() -> None:
    from cloud.errors import BrokerStartError

    with socket.socket() as occupant:
        occupant.bind(("127.0.0.1", 0))
        occupant.listen()
        busy = occupant.getsockname()[1]
        broker = EmbeddedBroker("127.0.0.1", busy, allow_anonymous=True, fallback_to_free_port=False)
        with pytest.raises(BrokerStartError, match="could not start"):
            broker.start()


def test_stop_closes_the_listener_and_is_idempotent() -> None:
    broker = EmbeddedBroker("127.0.0.1", 0, allow_anonymous=True)
    broker.start()
    port = broker.port
    broker.stop()
    broker.stop()
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_client_never_receives_retained_messages_of_topics_it_did_not_subscribe(
    amqtt_url: str, topic_base: str
) -> None:
    with connected_client(amqtt_url) as (publisher, _):
        publish(publisher, f"{topic_base}/devices/other/desired", b"not-yours", retain=True)
        publish(publisher, f"{topic_base}/devices/mine/desired", b"yours", retain=True)
    # Another client holding a wildcard subscription must not leak its matches to newcomers.
    with connected_client(amqtt_url, f"{topic_base}/devices/+/desired") as (_, watcher):
        watcher.wait_for(lambda m: m.payload == b"not-yours")
        with connected_client(amqtt_url, f"{topic_base}/devices/mine/desired") as (_, device):
            device.wait_for(lambda m: m.payload == b"yours")
            with connected_client(amqtt_url, f"{topic_base}/devices/mine/events") as (_, late):
                pass
    assert [m.payload for m in device.messages] == [b"yours"]
    assert late.messages == []
