"""The MQTT bridge: devices' reports, events and telemetry into the registry; desired states out, retained.

Paho's network thread only enqueues; a worker thread decodes, writes to the database and then
acknowledges (manual QoS 1 acks), so a slow database can never starve keepalives, and a message is
acknowledged only once it has been applied or rejected. A malformed payload or a topic outside the scheme
is logged with its reason, counted and dropped; it never raises out of a callback nor changes state.

On every (re)connect the bridge subscribes again and republishes every device's stored desired state,
because an embedded broker forgets its retained messages when it restarts.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session

from cloud.errors import ConfigurationError
from cloud.services import desired_states, ingest_event, ingest_reported
from cloud.telemetry.counters import IngestCounters
from cloud.telemetry.windows import ingest_telemetry
from protocol.codec import decode, encode
from protocol.errors import BrokerUrlError, MalformedMessageError, TopicError
from protocol.messages import DesiredState, DeviceEvent, Message, ReportedState, TelemetryWindow
from protocol.mqtt import BrokerAddress, parse_mqtt_url
from protocol.topics import Channel, Topics

__all__ = ["Decoded", "MqttBridge", "Rejected", "broker_address", "classify"]

log = logging.getLogger(__name__)

_INBOUND: dict[Channel, type[Message]] = {
    Channel.REPORTED: ReportedState,
    Channel.EVENTS: DeviceEvent,
    Channel.TELEMETRY: TelemetryWindow,
}
_DB_ATTEMPTS = 3
_STOP_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Decoded:
    """A valid inbound message and the channel it came on."""

    channel: Channel
    message: Message


@dataclass(frozen=True)
class Rejected:
    """A message to drop, with the channel to count it under and the reason to log."""

    channel: str
    reason: str


def classify(topics: Topics, topic: str, payload: bytes) -> Decoded | Rejected:
    """Decide what an inbound MQTT message is. Pure: no IO, never raises."""
    try:
        device_id, channel = topics.parse(topic)
    except TopicError as exc:
        return Rejected("unknown", str(exc))
    kind = _INBOUND.get(channel)
    if kind is None:
        return Rejected(channel.value, f"the coordinator does not accept messages on {channel.value}")
    try:
        message = decode(kind, payload)
    except MalformedMessageError as exc:
        return Rejected(channel.value, str(exc))
    claimed = getattr(message, "device_id", None)
    if claimed != device_id:
        # One device must not speak for another by publishing on its own topic with another id.
        return Rejected(channel.value, f"payload device_id {claimed!r} does not match topic device {device_id!r}")
    return Decoded(channel, message)


def broker_address(url: str) -> BrokerAddress:
    """The broker address in `url`; `ConfigurationError` (the operator's setting) if it is not an MQTT URL."""
    try:
        return parse_mqtt_url(url)
    except BrokerUrlError as exc:
        raise ConfigurationError(str(exc)) from exc


@dataclass(frozen=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    epoch: int


class _Republish:
    """Worker job: publish every stored desired state (after a connect)."""


_Job = _Inbound | _Republish | None


class MqttBridge:
    """Connects the registry to the broker at `url`; implements `DesiredStatePublisher`."""

    def __init__(
        self,
        *,
        url: str,
        topics: Topics,
        engine: Engine,
        counters: IngestCounters,
        client_id: str,
        keepalive: int = 30,
    ) -> None:
        self.url = url
        self.topics = topics
        self._engine = engine
        self.counters = counters
        self._keepalive = keepalive
        self._address = address = broker_address(url)
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False, manual_ack=True
        )
        if address.tls:
            self._client.tls_set()
        if address.username is not None:
            self._client.username_pw_set(address.username, address.password)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._epoch = 0
        self._connected = threading.Event()
        self._worker: threading.Thread | None = None
        self._stopping = False

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and connect in the background (paho retries with backoff until it succeeds)."""
        self._worker = threading.Thread(target=self._work, name="edgefleet-bridge-worker", daemon=True)
        self._worker.start()
        self._client.connect_async(self._address.host, self._address.port, keepalive=self._keepalive)
        self._client.loop_start()
        log.info("mqtt bridge connecting url=%s base=%s", self.url, self.topics.base)

    def wait_connected(self, timeout: float) -> bool:
        """Block until connected (or `timeout` seconds); True if connected."""
        return self._connected.wait(timeout)

    @property
    def connected(self) -> bool:
        """True while the bridge holds a broker connection."""
        return self._connected.is_set()

    def stop(self) -> None:
        """Disconnect, drain the worker and stop paho's thread."""
        self._stopping = True
        self._jobs.put(None)
        if self._worker is not None:
            self._worker.join(_STOP_TIMEOUT_S)
        self._client.disconnect()
        self._client.loop_stop()
        self._connected.clear()
        log.info("mqtt bridge stopped")

    # -- publishing -----------------------------------------------------------------------------

    def publish_desired(self, state: DesiredState) -> None:
        """Publish a desired state retained at QoS 1; while disconnected, the next connect republishes it."""
        info = self._client.publish(self.topics.desired(state.device_id), encode(state), qos=1, retain=True)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning(
                "desired state queued until reconnect device=%s generation=%s reason=%s",
                state.device_id,
                state.generation,
                mqtt.error_string(info.rc),
            )
        self.counters.published()

    # -- paho callbacks (network thread: enqueue only) ------------------------------------------

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt bridge connection refused url=%s reason=%s", self.url, reason)
            return
        self._epoch += 1
        client.subscribe([(self.topics.all_devices(channel), 1) for channel in _INBOUND])
        self._connected.set()
        self.counters.connected()
        self._jobs.put(_Republish())
        log.info("mqtt bridge connected url=%s epoch=%d", self.url, self._epoch)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        if self._stopping:
            log.info("mqtt bridge disconnected url=%s", self.url)
        else:
            log.warning("mqtt bridge disconnected url=%s reason=%s (reconnecting with backoff)", self.url, reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._jobs.put(_Inbound(message.topic, bytes(message.payload), message.mid, message.qos, self._epoch))

    # -- worker thread --------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            try:
                if isinstance(job, _Republish):
                    self._republish()
                else:
                    self._ingest(job)
            except Exception:  # the worker must outlive any single bad job
                log.exception("mqtt bridge job failed job=%r", job)
            finally:
                if isinstance(job, _Inbound) and job.qos > 0 and job.epoch == self._epoch:
                    self._client.ack(job.mid, job.qos)

    def _republish(self) -> None:
        states = self._with_session(lambda session: desired_states(session=session))
        for state in states or []:
            self._client.publish(self.topics.desired(state.device_id), encode(state), qos=1, retain=True)
        self.counters.published(len(states or []))
        log.info("mqtt bridge republished desired states count=%d", len(states or []))

    def _ingest(self, job: _Inbound) -> None:
        verdict = classify(self.topics, job.topic, job.payload)
        self.counters.received(verdict.channel if isinstance(verdict, Rejected) else verdict.channel.value)
        if isinstance(verdict, Rejected):
            self.counters.rejected(verdict.channel, verdict.reason)
            log.warning("mqtt message rejected topic=%s reason=%s", job.topic, verdict.reason)
            return
        channel, message = verdict.channel.value, verdict.message
        if isinstance(message, ReportedState):
            done = self._with_session(lambda s: ingest_reported(session=s, state=message))
        elif isinstance(message, DeviceEvent):
            done = self._with_session(lambda s: ingest_event(session=s, event=message))
        elif isinstance(message, TelemetryWindow):
            done = self._with_session(lambda s: ingest_telemetry(session=s, window=message))
            if done is False:
                self.counters.duplicate()
                log.info("telemetry duplicate dropped device=%s seq=%d", message.device_id, message.seq)
                return
        if done is None:
            self.counters.failed(channel)
        else:
            self.counters.stored(channel)

    def _with_session(self, apply: Callable[[Session], Any]) -> Any:
        """Run `apply` in a fresh session, retrying transient database errors; None if it keeps failing."""
        for attempt in range(1, _DB_ATTEMPTS + 1):
            try:
                with Session(self._engine, expire_on_commit=False) as session:
                    result = apply(session)
                    return True if result is None else result
            except SQLAlchemyError as exc:
                log.warning("database write failed attempt=%d/%d error=%s", attempt, _DB_ATTEMPTS, exc)
                time.sleep(0.2 * attempt)
        return None
