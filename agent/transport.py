"""The MQTT transport behind a small interface, with the real paho-mqtt 2.x implementation.

The session is persistent (`clean_session=False`, a stable client id), so the broker keeps the
subscription and QoS 1 messages across short disconnects, and paho resends unacknowledged QoS 1
publishes after reconnecting (bounded by `max_queued`). The last will is the device's `offline`
reported state, retained.

Several brokers (the nodes of a cluster, or a primary and a standby) are tried in turn: every failed connect
moves to the next address, round robin, with paho's backoff between attempts. A lost connection is first tried
again where it was (a restarted broker keeps the session), then on the next. After every (re)connect the agent
subscribes again and re-publishes its retained reported state and its unconfirmed telemetry; paho resends the
QoS 1 publishes not yet acknowledged. One TLS context and client id serve every address.

A broker that moved (an embedded broker on a new port, a new host) is found again: after `rediscover_after`
failed connects in a row at every address, `rediscover()` asks where the brokers are now (an enrolled agent asks
the coordinator) and the next attempt goes there.
"""

from __future__ import annotations

import hashlib
import logging
import ssl
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from protocol.mqtt import BrokerAddress

__all__ = ["MqttTransport", "Transport", "client_id_for"]

log = logging.getLogger(__name__)

MessageHandler = Callable[[str, bytes], None]
ConnectHandler = Callable[[], None]
# Where the brokers are now, in the order to try them (None: unknown, keep trying the current addresses).
Rediscover = Callable[[], Sequence[BrokerAddress] | None]


class Transport(Protocol):
    """What the agent needs from a message transport."""

    def start(self, *, on_message: MessageHandler, on_connect: ConnectHandler) -> None:
        """Connect in the background (non-blocking), subscribing again after every (re)connect."""
        ...

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a message; QoS 1 messages survive disconnects up to the queue limit."""
        ...

    @property
    def connected(self) -> bool:
        """True while connected to the broker."""
        ...

    def close(self, *, timeout: float) -> None:
        """Deliver what is queued (up to `timeout`), disconnect cleanly (no last will) and stop."""
        ...


def client_id_for(device_id: str, topic_base: str) -> str:
    """A stable client id per (topic base, device): the persistent session belongs to that identity."""
    return f"ef-{device_id}-{hashlib.sha256(topic_base.encode()).hexdigest()[:8]}"


class MqttTransport:
    """paho-mqtt 2.x client with last will, persistent session, backoff reconnects, failover and resubscription."""

    def __init__(
        self,
        *,
        addresses: Sequence[BrokerAddress],
        client_id: str,
        subscriptions: list[str],
        will: tuple[str, bytes],
        reconnect_min_s: float = 1.0,
        reconnect_max_s: float = 60.0,
        keepalive_s: int = 30,
        max_queued: int = 1000,
        tls: ssl.SSLContext | None = None,
        rediscover: Rediscover | None = None,
        rediscover_after: int = 5,
    ) -> None:
        if not addresses:
            raise ValueError("an MQTT transport needs at least one broker address")
        self._addresses = tuple(addresses)
        self._index = 0  # of the address the current (or next) attempt goes to
        self._address = self._addresses[0]
        self._rediscover = rediscover
        self._rediscover_after = rediscover_after
        self._failed_connects = 0
        self._subscriptions = subscriptions
        self._keepalive = keepalive_s
        self._on_message: MessageHandler | None = None
        self._on_connect: ConnectHandler | None = None
        self._connected = threading.Event()
        # mids of QoS 1 publishes not yet acknowledged (paho keeps them queued across reconnects).
        self._unacked: set[int] = set()
        self._early_acks: set[int] = set()  # PUBACKs that beat `publish` to recording their mid
        self._unacked_cond = threading.Condition()
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        client.will_set(will[0], will[1], qos=1, retain=True)
        client.reconnect_delay_set(max(1, round(reconnect_min_s)), max(1, round(reconnect_max_s)))
        client.max_queued_messages_set(max_queued)
        client.username_pw_set(self._address.username, self._address.password)
        # One TLS setting for every address (`parse_mqtt_urls`). `tls`: the fleet CA and this device's client
        # certificate; else the system's CAs.
        if self._address.tls:
            client.tls_set_context(tls or ssl.create_default_context())
        client.on_connect = self._handle_connect
        client.on_disconnect = self._handle_disconnect
        client.on_connect_fail = self._handle_connect_fail
        client.on_message = self._handle_message
        client.on_publish = self._handle_publish
        self._client = client

    @property
    def connected(self) -> bool:
        """True while connected to the broker."""
        return self._connected.is_set()

    @property
    def address(self) -> BrokerAddress:
        """Where this transport connects now (changes on failover, and when a moved broker was found again)."""
        return self._address

    @property
    def addresses(self) -> tuple[BrokerAddress, ...]:
        """Every broker this transport fails over between, in order (replaced when moved brokers were found)."""
        return self._addresses

    def wait_connected(self, timeout: float) -> bool:
        """Wait for the first (or next) connection; False after `timeout` seconds."""
        return self._connected.wait(timeout)

    @property
    def unacknowledged(self) -> int:
        """QoS 1 publishes handed to paho that the broker has not acknowledged yet."""
        with self._unacked_cond:
            return len(self._unacked)

    def start(self, *, on_message: MessageHandler, on_connect: ConnectHandler) -> None:
        """Connect in the background; paho's loop thread reconnects with exponential backoff."""
        self._on_message, self._on_connect = on_message, on_connect
        self._client.connect_async(self._address.host, self._address.port, keepalive=self._keepalive)
        self._client.loop_start()

    def publish(self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False) -> None:
        """Queue a publish (sent now, or after the next reconnect for QoS 1)."""
        info = self._client.publish(topic, payload, qos=qos, retain=retain)
        if info.rc == mqtt.MQTT_ERR_QUEUE_SIZE:
            log.warning("MQTT queue full; dropped a message to %s", topic)
        elif qos > 0:
            # Not holding our lock around paho's publish: paho calls on_publish under its own lock (lock order).
            with self._unacked_cond:
                if info.mid in self._early_acks:
                    self._early_acks.discard(info.mid)
                else:
                    self._unacked.add(info.mid)

    def close(self, *, timeout: float) -> None:
        """Wait (bounded, while connected) for queued QoS 1 messages, then disconnect and stop the loop."""
        with self._unacked_cond:
            self._unacked_cond.wait_for(lambda: not self._unacked or not self.connected, timeout=timeout)
            if self._unacked:
                log.warning("disconnecting with %d unacknowledged messages", len(self._unacked))
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()

    def _handle_connect(self, client: mqtt.Client, _userdata: Any, flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            # A broker that answers but refuses (busy, unavailable, this node's credentials) is no better than one
            # that cannot be reached: paho would retry it forever, so the next attempt goes to the next broker.
            log.warning("MQTT connection to %s:%s refused: %s", self._address.host, self._address.port, reason)
            self._next_broker(client, "refused the connection")
            return
        log.info(
            "MQTT connected to %s:%s (session present: %s)",
            self._address.host,
            self._address.port,
            flags.session_present,
        )
        self._failed_connects = 0
        for topic in self._subscriptions:
            client.subscribe(topic, qos=1)
        self._connected.set()
        self._call(self._on_connect)

    def _handle_connect_fail(self, client: mqtt.Client, _userdata: Any) -> None:
        """paho could not connect (unreachable, TLS failed): try the next broker."""
        self._next_broker(client, "unreachable")

    def _next_broker(self, client: mqtt.Client, why: str) -> None:
        """Point paho's next attempt at the next broker (none with one broker); after every broker failed a few times
        in a row, ask where the brokers are."""
        self._failed_connects += 1
        failed = self._address
        if self._rediscover is not None and self._failed_connects >= self._rediscover_after * len(self._addresses):
            self._failed_connects = 0
            found = self._ask_where()
            if found is not None:
                self._addresses = found
                self._connect_to(client, 0)
                return
        if len(self._addresses) > 1:
            self._connect_to(client, (self._index + 1) % len(self._addresses))
            following = self._address
            log.warning(
                "broker %s:%s %s; failing over to %s:%s",
                failed.host,
                failed.port,
                why,
                following.host,
                following.port,
            )

    def _ask_where(self) -> tuple[BrokerAddress, ...] | None:
        """The brokers' addresses if `rediscover` names others than the current ones (with the same TLS), else None."""
        assert self._rediscover is not None
        current = self._addresses
        named = _named(current)
        try:
            found = tuple(self._rediscover() or ())
        except Exception as exc:  # the coordinator may be down too: keep trying the current addresses
            log.warning("broker %s unreachable; asking where it is failed: %s", named, exc)
            return None
        if not found or [(a.host, a.port) for a in found] == [(a.host, a.port) for a in current]:
            log.warning(
                "broker %s failed %d attempts each; the coordinator still names it, trying on",
                named,
                self._rediscover_after,
            )
            return None
        if any(a.tls != current[0].tls for a in found):
            log.error("the broker moved to %s with another TLS setting; restart the agent", _named(found))
            return None
        log.warning(
            "broker %s failed %d attempts each; the coordinator says it moved to %s: connecting there",
            named,
            self._rediscover_after,
            _named(found),
        )
        return found

    def _connect_to(self, client: mqtt.Client, index: int) -> None:
        """Make address `index` the target of paho's next attempt (called from paho's thread, between attempts)."""
        address = self._addresses[index]
        client.username_pw_set(address.username, address.password)
        client.connect_async(address.host, address.port, keepalive=self._keepalive)
        self._index, self._address = index, address

    def _handle_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        with self._unacked_cond:
            self._unacked_cond.notify_all()
        if reason.is_failure:
            log.warning(
                "MQTT disconnected from %s:%s: %s; reconnecting", self._address.host, self._address.port, reason
            )

    def _handle_publish(self, _client: mqtt.Client, _userdata: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._unacked_cond:
            if mid in self._unacked:
                self._unacked.discard(mid)
            else:
                self._early_acks.add(mid)
            self._unacked_cond.notify_all()

    def _handle_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        if self._on_message is not None:
            self._call(self._on_message, message.topic, bytes(message.payload))

    @staticmethod
    def _call(handler: Callable[..., None] | None, *args: Any) -> None:
        # paho stops its loop thread on an exception escaping a callback; a bad message must not do that.
        if handler is None:
            return
        try:
            handler(*args)
        except Exception:
            log.exception("MQTT handler failed")


def _named(addresses: Sequence[BrokerAddress]) -> str:
    """`host:port, host:port` for logs."""
    return ", ".join(f"{a.host}:{a.port}" for a in addresses)
