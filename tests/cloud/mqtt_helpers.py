"""Small paho helpers for cloud tests: a connected client that records what it receives."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@dataclass
class Received:
    """Messages a test client has received, with a bounded wait."""

    messages: list[mqtt.MQTTMessage] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def add(self, message: mqtt.MQTTMessage) -> None:
        with self._cond:
            self.messages.append(message)
            self._cond.notify_all()

    def wait_for(self, predicate: Callable[[mqtt.MQTTMessage], bool], timeout: float = 10.0) -> mqtt.MQTTMessage:
        """The first received message matching `predicate`; AssertionError after `timeout`."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for message in self.messages:
                    if predicate(message):
                        return message
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    topics = [m.topic for m in self.messages]
                    raise AssertionError(f"no matching message within {timeout}s; received {topics}")
                self._cond.wait(remaining)


def host_port(url: str) -> tuple[str, int]:
    """Host and port of an `mqtt://` URL."""
    parts = urlsplit(url)
    return parts.hostname or "127.0.0.1", parts.port or 1883


def new_client(client_id: str | None = None) -> mqtt.Client:
    """A paho 2.x client with the VERSION2 callback API."""
    return mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id or uuid.uuid4().hex)


@contextmanager
def connected_client(
    url: str, *subscriptions: str, will: tuple[str, bytes] | None = None
) -> Iterator[tuple[mqtt.Client, Received]]:
    """A connected client subscribed (QoS 1) to `subscriptions`, recording messages; disconnected afterwards."""
    client = new_client()
    received = Received()
    subscribed = threading.Event()
    pending = {"n": len(subscriptions)}

    def on_subscribe(*_args: object) -> None:
        pending["n"] -= 1
        if pending["n"] <= 0:
            subscribed.set()

    client.on_message = lambda _c, _u, message: received.add(message)
    client.on_subscribe = on_subscribe
    if will is not None:
        client.will_set(will[0], will[1], qos=1, retain=True)
    host, port = host_port(url)
    client.connect(host, port, keepalive=30)
    client.loop_start()
    try:
        for topic in subscriptions:
            client.subscribe(topic, qos=1)
        if subscriptions:
            assert subscribed.wait(10), "subscription not acknowledged within 10s"
        yield client, received
    finally:
        client.disconnect()
        client.loop_stop()


def publish(client: mqtt.Client, topic: str, payload: bytes, *, retain: bool = False) -> None:
    """Publish at QoS 1 and wait until the broker acknowledged it."""
    info = client.publish(topic, payload, qos=1, retain=retain)
    info.wait_for_publish(10)
    assert info.is_published(), f"publish to {topic} not acknowledged"
