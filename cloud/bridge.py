"""The MQTT bridge: devices' reports, events and telemetry into the registry; desired states out, retained.

Paho's network thread only enqueues; a worker thread decodes, writes to the database and then
acknowledges (manual QoS 1 acks), so a slow database can never starve keepalives, and a message is
acknowledged only once it has been applied or rejected. A malformed payload or a topic outside the scheme
is logged with its reason, counted and dropped; it never raises out of a callback nor changes state.

While the database does not answer (`cloud.outage`), the worker retries the same message with backoff and
takes no other: nothing is acknowledged, so the broker keeps the messages of the persistent session and
redelivers them after a reconnect. A message that fails for a reason a retry cannot fix (a bug, data the
database refuses) is logged, counted as failed and acknowledged.

Telemetry is stored in batches: the worker drains up to `batch_max` queued telemetry windows (or what arrives
within `batch_wait_s` of the first) and stores them in one transaction (`cloud.telemetry.ingest.store_windows`);
each of them is acknowledged to the broker only after that commit. Any other message ends the batch, which is
stored before it, so the order of a device's messages holds. A batch that fails for a reason a retry cannot fix
is stored again window by window, so only the window at fault is counted as failed.
Reported states and events queued back to back are applied the same way, in one transaction in their order
(`_run_reports`; no waiting for more), and acknowledged after its commit; a run that fails for good is applied
again message by message.

After storing telemetry the bridge publishes the device's `TelemetryAck` retained, at most once a second per device
(every 5 s while a backlog of telemetry waits) plus once when a burst ends (`cloud.telemetry.acks`), and at once
after an online report (an agent reports on every connect; one that lost its seq counter waits for this answer).
Computing it settles the device's chain of windows; a hole in it is reported as a gap once `gap_grace_s` is over
(`cloud.telemetry.gaps`), the bridge coming back to it then even if the device stays silent. A bridge that takes
telemetry acknowledges, after its process's first connect, every device heard from in the last two minutes: a
process killed after storing windows but before its throttled acknowledgement went out (their PUBACKs sent, so the
broker redelivers nothing) would otherwise leave those devices unconfirmed until their agents resend.

On every (re)connect the bridge subscribes again and republishes every device's stored desired state,
because an embedded broker forgets its retained messages when it restarts. A desired state is never
published after a newer generation of the same device (`publish_desired`), whichever thread publishes.

A message the broker replays from its store (RETAIN flag set: a retained message, or one an embedded broker
kept across its restart) is applied but is no sign of life: after a coordinator start only a live message
makes a device `online` again (`cloud.services.devices.mark_unconfirmed`).

Several ingest processes (`Settings.ingest_processes`, `cloud.telemetry.processes`): each runs a bridge, the
coordinator's own with every channel and the others with `channels=(TELEMETRY,)`, and all of them take telemetry
through one MQTT shared subscription (`$share/<group>/...`), so the broker hands each window to one of them. Only
a bridge taking reported states republishes desired states. A device's acknowledgements may then come from two
processes in any order; an older one only confirms less (`TelemetryAck.confirms`), and each process acknowledges
a device once more an interval after its last window, so the last word is computed after every process's commit.

Replicas of one coordinator (`Settings.replicated`, `share_inbound`): every inbound channel comes through the shared
subscription, so each report, event and window is applied by one replica. Their sessions are clean: a replica that
dies loses only what the broker had handed it unacknowledged (telemetry comes again from the agents' outboxes), and
the broker hands the dead replica nothing more once its connection is gone. Every replica republishes the stored
desired states on connect (the same retained messages: harmless).

Several brokers (`url` lists the nodes of a cluster, comma-separated): the bridge connects to the first; a lost
connection is tried again where it was (a restarted broker keeps the session), and every failed connect moves to the
next address, round robin, with paho's backoff between attempts, as the agent does. Any (re)connect subscribes again
and republishes the desired states, so a node that holds no session or retained messages of ours is brought up to
date. One TLS context and client id serve every node; each URL brings its own credentials.
"""

from __future__ import annotations

import logging
import queue
import struct
import threading
import time
from collections.abc import Callable, Collection
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from cloud.errors import ConfigurationError
from cloud.outage import DatabaseUnavailableError, PatientDatabase
from cloud.services.deployments import desired_states
from cloud.services.devices import confirm_heard, confirm_heard_all, ingest_batch, ingest_event, ingest_reported
from cloud.services.enrolment import UnknownDeviceError
from cloud.telemetry.acks import (
    Acknowledgement,
    AckThrottle,
    acknowledge_devices,
    acknowledge_telemetry,
    recently_heard,
)
from cloud.telemetry.collector import pace_full_collections
from cloud.telemetry.counters import IngestCounters
from cloud.telemetry.decoding import decode_message
from cloud.telemetry.gaps import GAP_GRACE_S
from cloud.telemetry.ingest import Arrival, Outcome, Stored, store_windows
from cloud.telemetry.rollups import DEFAULT_BUCKET_S
from cloud.telemetry.windows import ingest_telemetry
from protocol.codec import encode
from protocol.errors import BrokerUrlError, MalformedMessageError, TopicError
from protocol.messages import DesiredState, DeviceEvent, DeviceStatus, Message, ReportedState, TelemetryWindow
from protocol.mqtt import BrokerAddress, parse_mqtt_url, parse_mqtt_urls, redact_mqtt_url
from protocol.topics import Channel, Topics

__all__ = [
    "INBOUND_CHANNELS",
    "BridgeTls",
    "Cleared",
    "Decoded",
    "MqttBridge",
    "Rejected",
    "broker_address",
    "broker_addresses",
    "classify",
    "shared_filter",
]

log = logging.getLogger(__name__)

_INBOUND: dict[Channel, type[Message]] = {
    Channel.REPORTED: ReportedState,
    Channel.EVENTS: DeviceEvent,
    Channel.TELEMETRY: TelemetryWindow,
}
INBOUND_CHANNELS = tuple(_INBOUND)
_STOP_TIMEOUT_S = 10.0
_ACK_INTERVAL_S = 1.0
_BUSY_ACK_INTERVAL_S = 5.0  # with a backlog of telemetry: well inside an agent's 30 s resend interval
# A process that stored windows and died before its throttled acknowledgement went out left their devices waiting
# (until their agents resend, 30 s later): a starting process acknowledges the devices heard from this long ago.
_REACKNOWLEDGE_S = 120.0
BATCH_MAX = 500
BATCH_WAIT_S = 0.005


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


@dataclass(frozen=True)
class Cleared:
    """An empty payload: a retained message being deleted (e.g. after a revocation), not a message to store."""

    channel: str


def classify(topics: Topics, topic: str, payload: bytes) -> Decoded | Rejected | Cleared:
    """Decide what an inbound MQTT message is. Pure: no IO, never raises."""
    try:
        device_id, channel = topics.parse(topic)
    except TopicError as exc:
        return Rejected("unknown", str(exc))
    if not payload:
        return Cleared(channel.value)
    kind = _INBOUND.get(channel)
    if kind is None:
        return Rejected(channel.value, f"the coordinator does not accept messages on {channel.value}")
    try:
        message = decode_message(kind, payload)  # `protocol.codec.decode`'s verdict, in one pass when it can
    except MalformedMessageError as exc:
        return Rejected(channel.value, str(exc))
    claimed = getattr(message, "device_id", None)
    if claimed != device_id:
        # One device must not speak for another by publishing on its own topic with another id.
        return Rejected(channel.value, f"payload device_id {claimed!r} does not match topic device {device_id!r}")
    return Decoded(channel, message)


def shared_filter(group: str, topic_filter: str) -> str:
    """`topic_filter` as a member of the shared subscription `group` (MQTT 5; Mosquitto 2 also for MQTT 3.1.1)."""
    return f"$share/{group}/{topic_filter}"


def broker_address(url: str) -> BrokerAddress:
    """The broker address in `url`; `ConfigurationError` (the operator's setting) if it is not an MQTT URL."""
    try:
        return parse_mqtt_url(url)
    except BrokerUrlError as exc:
        raise ConfigurationError(str(exc)) from exc


def broker_addresses(urls: str) -> tuple[BrokerAddress, ...]:
    """The broker addresses in the comma-separated `urls`; `ConfigurationError` (the operator's setting) if one is not
    an MQTT URL or they mix TLS and plain TCP."""
    try:
        return parse_mqtt_urls(urls)
    except BrokerUrlError as exc:
        raise ConfigurationError(str(exc)) from exc


def _puback_all(client: mqtt.Client, mids: list[int]) -> None:
    """Acknowledge QoS 1 messages `mids` (the bridge subscribes at QoS 1) in one write to the broker.

    `client.ack` queues one PUBACK per message, each waking paho's network thread through its socket pair and
    written by a `send` of its own: ~500 system calls on each side per batch of windows. The same PUBACKs (MQTT
    3.1.1 and 5: `0x40 0x02 <mid>`, reason code omitted meaning success) go as one packet through paho's queue,
    in order behind anything already queued. Without that queue (another paho major version) one by one.
    """
    if not mids:
        return
    queue_packet = getattr(client, "_packet_queue", None)
    if len(mids) == 1 or queue_packet is None:
        for mid in mids:
            client.ack(mid, 1)
        return
    packet = b"".join(_PUBACK.pack(0x40, 2, mid) for mid in mids)
    queue_packet(0x40, packet, 0, 0)


_PUBACK = struct.Struct("!BBH")


@dataclass(frozen=True)
class _Inbound:
    topic: str
    payload: bytes
    mid: int
    qos: int
    epoch: int
    # The broker replays it from its store (RETAIN flag) rather than forwarding what a device just sent.
    replayed: bool = False


@dataclass(frozen=True)
class _Window:
    """An inbound message decoded as a telemetry window: a member of a batch."""

    job: _Inbound
    window: TelemetryWindow


@dataclass(frozen=True)
class _Report:
    """An inbound message decoded as a reported state or an event: a member of a batch."""

    job: _Inbound
    channel: Channel
    message: ReportedState | DeviceEvent


class _Republish:
    """Worker job: publish every stored desired state (after a connect)."""


class _Idle:
    """Worker wake-up without a job: a deferred telemetry acknowledgement is due."""


class _Reacknowledge:
    """Worker job: acknowledge every device heard from lately (after this process's first connect)."""


_Job = _Inbound | _Republish | _Reacknowledge | _Idle | None


@dataclass(frozen=True)
class BridgeTls:
    """The CA to trust and the coordinator's client certificate for an `mqtts://` broker."""

    ca: Path
    cert: Path
    key: Path


class MqttBridge:
    """Connects the registry to the broker at `url` (or the first reachable of several, comma-separated);
    implements `DesiredStatePublisher`."""

    def __init__(
        self,
        *,
        url: str,
        topics: Topics,
        engine: Engine,
        counters: IngestCounters,
        client_id: str,
        tls: BridgeTls | None = None,
        keepalive: int = 30,
        gap_grace_s: float = GAP_GRACE_S,
        batch_max: int = BATCH_MAX,
        batch_wait_s: float = BATCH_WAIT_S,
        bucket_s: int = DEFAULT_BUCKET_S,
        channels: Collection[Channel] = INBOUND_CHANNELS,
        share_group: str | None = None,
        share_telemetry: bool = False,
        share_inbound: bool = False,
    ) -> None:
        """`channels`: the inbound channels this bridge subscribes to. `share_group`: the shared subscription
        telemetry comes through with `share_telemetry` (several ingest processes), and which one to leave without
        it (a coordinator that ran with several before); None: no shared subscription is touched. `share_inbound`:
        every channel through `share_group` (replicas of one coordinator), on a clean session."""
        unknown = set(channels) - set(_INBOUND)
        if unknown or not channels:
            raise ValueError(f"a bridge takes some of {[c.value for c in _INBOUND]}, not {sorted(map(str, channels))}")
        if share_telemetry and (share_group is None or Channel.TELEMETRY not in channels):
            raise ValueError("share_telemetry needs a share_group and the telemetry channel")
        if share_inbound and share_group is None:
            raise ValueError("share_inbound needs a share_group")
        self.url = redact_mqtt_url(url)
        self.topics = topics
        self._engine = engine
        self.counters = counters
        self._keepalive = keepalive
        self._addresses = broker_addresses(url)
        self._index = 0
        self._address = address = self._addresses[0]
        self._client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=client_id,
            # A replica's session is clean: Mosquitto keeps handing a disconnected member of a shared subscription its
            # share, queued in its session, so a dead replica's persistent session would swallow 1/N of the fleet's
            # messages until it came back (or forever: its default name changes with its pid).
            clean_session=share_inbound,
            manual_ack=True,
        )
        if address.tls:
            if tls is None:
                self._client.tls_set()
            else:  # the fleet CA, and the coordinator's client certificate for a fleet broker
                self._client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
        if address.username is not None:
            self._client.username_pw_set(address.username, address.password)
        self._client.reconnect_delay_set(min_delay=1, max_delay=30)
        self._client.on_connect = self._on_connect
        self._client.on_connect_fail = self._on_connect_fail
        self._client.on_disconnect = self._on_disconnect
        self._client.on_message = self._on_message
        self._jobs: queue.Queue[_Job] = queue.Queue()
        self._epoch = 0
        self._connected = threading.Event()
        self._worker: threading.Thread | None = None
        self._stopping = False
        self._database = PatientDatabase(engine, on_outage=lambda down: counters.database(down=down))
        self._acks = AckThrottle(_ACK_INTERVAL_S, _BUSY_ACK_INTERVAL_S)
        self._gap_grace_s = gap_grace_s  # how long a hole in a device's telemetry chain waits before it is reported
        self._batch_max = max(1, batch_max)  # most telemetry windows stored in one transaction
        self._batch_wait_s = batch_wait_s  # how long a batch waits to fill once its first window is taken
        self._bucket_s = bucket_s  # rollup bucket length
        self._confirmed: set[str] = set()  # devices heard on a live session since this start (worker thread only)
        self._desired_lock = threading.Lock()
        self._desired_generation: dict[str, int] = {}  # device → highest generation handed to the broker
        self._channels = tuple(channels)
        self._share_group = share_group
        self._shared = share_telemetry or share_inbound  # telemetry through `$share/<share_group>/...`, split
        self._share_all = share_inbound  # and every other inbound channel too (replicas)
        # Only the bridge that hears reported states owns desired states (their republish after a connect).
        self._owns_desired = Channel.REPORTED in self._channels

    # -- lifecycle ------------------------------------------------------------------------------

    def start(self) -> None:
        """Start the worker and connect in the background (paho retries with backoff until it succeeds)."""
        if Channel.TELEMETRY in self._channels:
            pace_full_collections()  # batches of windows would set off a full collection every ~3,000 windows
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

    @property
    def database_down(self) -> bool:
        """True while the worker waits for the database to answer (messages held, unacknowledged)."""
        return self._database.down

    def stop(self) -> None:
        """Disconnect, drain the worker (or stop it waiting for the database) and stop paho's thread."""
        self._stopping = True
        self._database.stop()
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
        self._publish_desired(state)

    def _publish_desired(self, state: DesiredState) -> bool:
        """Hand `state` to the broker unless a newer generation of its device was handed over; True if published."""
        with self._desired_lock:  # compare and publish as one: the API thread and the worker both publish
            newest = self._desired_generation.get(state.device_id, -1)
            if state.generation < newest:
                log.info(
                    "desired state not published: generation %d of device=%s is older than the published %d",
                    state.generation,
                    state.device_id,
                    newest,
                )
                return False
            info = self._client.publish(self.topics.desired(state.device_id), encode(state), qos=1, retain=True)
            self._desired_generation[state.device_id] = state.generation
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            log.warning(
                "desired state queued until reconnect device=%s generation=%s reason=%s",
                state.device_id,
                state.generation,
                mqtt.error_string(info.rc),
            )
        self.counters.published()
        return True

    def clear_retained(self, device_id: str) -> None:
        """Delete a device's retained desired and reported states (an empty retained message clears one)."""
        for topic in (self.topics.desired(device_id), self.topics.reported(device_id), self.topics.ack(device_id)):
            self._client.publish(topic, b"", qos=1, retain=True)
        log.info("retained messages cleared device=%s", device_id)

    # -- paho callbacks (network thread: enqueue only) ------------------------------------------

    @property
    def broker(self) -> str:
        """`host:port` of the broker this bridge connects to now (changes on failover)."""
        return f"{self._address.host}:{self._address.port}"

    def _on_connect(self, client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("mqtt bridge connection refused broker=%s reason=%s", self.broker, reason)
            return
        self._epoch += 1
        subscribe, leave = self._filters()
        client.subscribe([(topic_filter, 1) for topic_filter in subscribe])
        if leave:  # the persistent session may hold the other telemetry subscription of an earlier start
            client.unsubscribe(leave)
        self._connected.set()
        self.counters.connected()
        if self._owns_desired:
            self._jobs.put(_Republish())
        if self._epoch == 1 and Channel.TELEMETRY in self._channels:
            self._jobs.put(_Reacknowledge())
        log.info("mqtt bridge connected broker=%s epoch=%d", self.broker, self._epoch)

    def _filters(self) -> tuple[list[str], list[str]]:
        """The topic filters to subscribe to, and the telemetry one to leave (plain or shared: the one not used)."""
        subscribe, leave = [], []
        for channel in self._channels:
            plain = self.topics.all_devices(channel)
            if self._share_all and self._share_group is not None:
                subscribe.append(shared_filter(self._share_group, plain))
                continue
            if channel is not Channel.TELEMETRY or self._share_group is None:
                subscribe.append(plain)
                continue
            shared = shared_filter(self._share_group, plain)
            subscribe.append(shared if self._shared else plain)
            leave.append(plain if self._shared else shared)
        return subscribe, leave

    def _on_connect_fail(self, client: mqtt.Client, _userdata: Any) -> None:
        """paho could not connect (unreachable, TLS failed): the next attempt goes to the next broker, if any."""
        if len(self._addresses) < 2 or self._stopping:
            return
        failed = self.broker
        self._index = (self._index + 1) % len(self._addresses)
        self._address = address = self._addresses[self._index]
        # Called on paho's thread between attempts: the next reconnect uses this host, port and credentials.
        client.username_pw_set(address.username, address.password)
        client.connect_async(address.host, address.port, keepalive=self._keepalive)
        log.warning("mqtt bridge: broker %s unreachable; failing over to %s", failed, self.broker)

    def _on_disconnect(self, _client: mqtt.Client, _userdata: Any, _flags: Any, reason: Any, _props: Any) -> None:
        self._connected.clear()
        if self._stopping:
            log.info("mqtt bridge disconnected broker=%s", self.broker)
        else:
            log.warning("mqtt bridge disconnected broker=%s reason=%s (reconnecting with backoff)", self.broker, reason)

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._jobs.put(
            _Inbound(message.topic, bytes(message.payload), message.mid, message.qos, self._epoch, message.retain)
        )

    # -- worker thread --------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            job = self._next_job()
            while job is not None:
                following: _Job | _Idle = _Idle()
                if isinstance(job, _Inbound) and isinstance(window := self._telemetry(job), _Window):
                    batch, following = self._fill_batch(window)
                    self._run_batch(batch)
                elif isinstance(job, _Inbound) and isinstance(report := self._report(job), _Report):
                    reports, following = self._fill_reports(report)
                    self._run_reports(reports)
                else:
                    self._run(job)
                self._acknowledge_due()
                job = following if not isinstance(following, _Idle) else self._next_job()
        except DatabaseUnavailableError:
            log.info("mqtt bridge stopped while waiting for the database; unacknowledged messages stay with the broker")

    def _next_job(self) -> _Job:
        """The next job; `_Idle` when a deferred telemetry acknowledgement falls due first."""
        due = self._acks.next_due()
        try:
            return self._jobs.get(timeout=None if due is None else max(0.0, due - time.monotonic()))
        except queue.Empty:
            return _Idle()

    def _run(self, job: _Inbound | _Republish | _Reacknowledge | _Idle) -> None:
        """Do one job; an inbound message is acknowledged once applied, rejected or failed for good."""
        try:
            if isinstance(job, _Republish):
                self._republish()
            elif isinstance(job, _Reacknowledge):
                heard = self._with_session(lambda s: recently_heard(s, _REACKNOWLEDGE_S))
                for start in range(0, len(heard), self._batch_max):
                    self._acknowledge_many(heard[start : start + self._batch_max])
            elif isinstance(job, _Inbound):
                self._ingest(job)
        except DatabaseUnavailableError:
            raise  # stopping during an outage: leave the message unacknowledged for redelivery
        except Exception:  # a bug in the bridge itself: the worker must outlive any single bad job
            log.exception("mqtt bridge job failed job=%r", job)
        if isinstance(job, _Inbound) and job.qos > 0 and job.epoch == self._epoch:
            self._client.ack(job.mid, job.qos)

    def _telemetry(self, job: _Inbound) -> _Window | None:
        """The job as a decoded telemetry window, or None for anything else (handled one by one)."""
        if not job.topic.endswith(f"/{Channel.TELEMETRY.value}"):
            return None
        verdict = classify(self.topics, job.topic, job.payload)
        if isinstance(verdict, Decoded) and isinstance(verdict.message, TelemetryWindow):
            return _Window(job, verdict.message)
        return None

    def _fill_batch(self, first: _Window) -> tuple[list[_Window], _Job | _Idle]:
        """`first` and the telemetry queued behind it (up to `batch_max`, waiting at most `batch_wait_s` for more);
        the job that ended the batch (anything but a window: to run next), else `_Idle`."""
        batch = [first]
        deadline = time.monotonic() + self._batch_wait_s
        while len(batch) < self._batch_max:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                try:
                    job = self._jobs.get(timeout=remaining)
                except queue.Empty:
                    break
            window = self._telemetry(job) if isinstance(job, _Inbound) else None
            if window is None:
                return batch, job
            batch.append(window)
        return batch, _Idle()

    def _report(self, job: _Inbound) -> _Report | None:
        """The job as a decoded reported state or event, or None for anything else (handled on its own)."""
        if not job.topic.endswith((f"/{Channel.REPORTED.value}", f"/{Channel.EVENTS.value}")):
            return None
        verdict = classify(self.topics, job.topic, job.payload)
        if isinstance(verdict, Decoded) and isinstance(verdict.message, ReportedState | DeviceEvent):
            return _Report(job, verdict.channel, verdict.message)
        return None

    def _fill_reports(self, first: _Report) -> tuple[list[_Report], _Job | _Idle]:
        """`first` and the reported states and events queued right behind it (up to `batch_max`, no waiting);
        the job that ended the run (to run next), else `_Idle`."""
        reports = [first]
        while len(reports) < self._batch_max:
            try:
                job = self._jobs.get_nowait()
            except queue.Empty:
                break
            report = self._report(job) if isinstance(job, _Inbound) else None
            if report is None:
                return reports, job
            reports.append(report)
        return reports, _Idle()

    def _run_reports(self, reports: list[_Report]) -> None:
        """Apply reported states and events in one transaction (in their order), then acknowledge each to the broker.

        A run that fails for a reason a retry cannot fix is applied again message by message (`_run`), so only the
        message at fault is counted as failed. One message per transaction made each report cost a commit.
        """
        if len(reports) == 1:
            self._run(reports[0].job)
            return
        try:
            unknown = self._with_session(lambda s: self._apply_reports(s, reports))
        except DatabaseUnavailableError:
            raise
        except Exception as exc:  # not transient: find the message at fault, apply the others
            log.warning(
                "report batch failed (%s: %s), applying its %d messages one by one",
                type(exc).__name__,
                exc,
                len(reports),
            )
            for report in reports:
                self._run(report.job)
            return
        online: dict[str, None] = {}  # devices whose online report is answered, in order, once each
        heard: dict[str, None] = {}  # devices an event confirms alive (a live report confirmed its own already)
        for index, report in enumerate(reports):
            channel, message, job = report.channel.value, report.message, report.job
            self.counters.received(channel)
            if index in unknown:
                self.counters.rejected(channel, unknown[index])
                log.warning("mqtt message ignored topic=%s reason=%s", job.topic, unknown[index])
            else:
                self.counters.stored(channel)
                if not job.replayed and isinstance(message, DeviceEvent) and message.device_id not in self._confirmed:
                    heard[message.device_id] = None
                if isinstance(message, ReportedState) and message.status is DeviceStatus.ONLINE:
                    online[message.device_id] = None
            if job.qos > 0 and job.epoch == self._epoch:
                self._client.ack(job.mid, job.qos)
        if heard:
            self._with_session(lambda s: confirm_heard_all(session=s, device_ids=list(heard)))
            self._confirmed.update(heard)
        if online:
            self._acknowledge_many(list(online))  # at once, as after a single online report, in one transaction

    @staticmethod
    def _apply_reports(session: Session, reports: list[_Report]) -> dict[int, str]:
        """Apply every report in `session`, then commit; returns why messages of devices not enrolled were ignored."""
        return ingest_batch(session=session, messages=[(r.message, not r.job.replayed) for r in reports])

    def _run_batch(self, batch: list[_Window]) -> None:
        """Store a batch of windows in one transaction, then acknowledge every message of it to the broker."""
        try:
            self._store_batch(batch)
        except DatabaseUnavailableError:
            raise  # stopping during an outage: leave the messages unacknowledged for redelivery
        except Exception:  # a bug in the bridge itself: the worker must outlive any single bad batch
            log.exception("mqtt bridge telemetry batch failed windows=%d", len(batch))
        epoch = self._epoch
        _puback_all(self._client, [item.job.mid for item in batch if item.job.qos > 0 and item.job.epoch == epoch])

    def _store_batch(self, batch: list[_Window]) -> None:
        channel = Channel.TELEMETRY.value
        self.counters.received(channel, len(batch))
        arrivals = [Arrival(item.window, live=not item.job.replayed) for item in batch]
        results: list[Stored | None]
        try:
            results = list(self._with_session(lambda s: store_windows(s, arrivals, bucket_s=self._bucket_s)))
        except DatabaseUnavailableError:
            raise
        except Exception as exc:  # not transient: find the window at fault, store the others
            if len(batch) > 1:
                log.warning(
                    "telemetry batch failed (%s: %s), storing its %d windows one by one",
                    type(exc).__name__,
                    exc,
                    len(batch),
                )
            results = [self._store_one(item, arrival) for item, arrival in zip(batch, arrivals, strict=True)]
        spoke: dict[str, bool] = {}
        stored = 0
        for item, result in zip(batch, results, strict=True):
            window = item.window
            if result is None:
                continue  # failed for good, counted and logged
            if result.outcome is Outcome.REJECTED:  # no auto-enrolment: only enrolled devices speak
                self.counters.rejected(channel, result.reason)
                log.warning("mqtt message ignored topic=%s reason=%s", item.job.topic, result.reason)
                continue
            if result.outcome is Outcome.DUPLICATE:
                self.counters.duplicate()
                log.info("telemetry duplicate dropped device=%s seq=%d", window.device_id, window.seq)
            else:
                stored += 1
            spoke[window.device_id] = spoke.get(window.device_id, False) or not item.job.replayed
        if stored:
            self.counters.stored(channel, stored)  # once per batch: the counters' lock is shared with the API
        now, due, busy = time.monotonic(), [], self._jobs.qsize() >= self._batch_max
        for device_id, live in spoke.items():
            if live:
                self._heard(device_id)  # a live report confirmed it already (`ingest_reported`)
            if self._acks.stored(device_id, now, busy=busy):  # now, or once its throttle interval is over
                due.append(device_id)
            if self._shared:  # once more after the last window: another process may commit after this one acks
                self._acks.recheck(device_id, now + _ACK_INTERVAL_S)
        self._acknowledge_many(due)

    def _store_one(self, item: _Window, arrival: Arrival) -> Stored | None:
        """One window of a failed batch in a transaction of its own; None if it fails for good (counted)."""
        try:
            [result] = self._with_session(lambda s: store_windows(s, [arrival], bucket_s=self._bucket_s))
            return result
        except DatabaseUnavailableError:
            raise
        except Exception as exc:  # not transient (a bug, data the database refuses): it would fail forever
            self.counters.failed(Channel.TELEMETRY.value)
            log.error("mqtt message failed, dropped topic=%s error=%s: %s", item.job.topic, type(exc).__name__, exc)
            return None

    def _republish(self) -> None:
        states = self._with_session(lambda session: desired_states(session=session))
        published = sum(self._publish_desired(state) for state in states)
        log.info("mqtt bridge republished desired states count=%d skipped_older=%d", published, len(states) - published)

    def _ingest(self, job: _Inbound) -> None:
        verdict = classify(self.topics, job.topic, job.payload)
        if isinstance(verdict, Cleared):
            log.debug("retained message cleared topic=%s", job.topic)
            return
        self.counters.received(verdict.channel if isinstance(verdict, Rejected) else verdict.channel.value)
        if isinstance(verdict, Rejected):
            self.counters.rejected(verdict.channel, verdict.reason)
            log.warning("mqtt message rejected topic=%s reason=%s", job.topic, verdict.reason)
            return
        channel, message = verdict.channel.value, verdict.message
        try:
            done = self._apply(message, live=not job.replayed)
        except UnknownDeviceError as exc:  # no auto-enrolment: only enrolled devices speak
            self.counters.rejected(channel, str(exc))
            log.warning("mqtt message ignored topic=%s reason=%s", job.topic, exc)
            return
        except DatabaseUnavailableError:
            raise
        except Exception as exc:  # not transient (a bug, data the database refuses): it would fail forever
            self.counters.failed(channel)
            log.error("mqtt message failed, dropped topic=%s error=%s: %s", job.topic, type(exc).__name__, exc)
            return
        if isinstance(message, TelemetryWindow) and done is False:
            self.counters.duplicate()
            log.info("telemetry duplicate dropped device=%s seq=%d", message.device_id, message.seq)
        else:
            self.counters.stored(channel)
        if not job.replayed and isinstance(message, DeviceEvent | TelemetryWindow):
            self._heard(message.device_id)  # a live report confirmed it already (`ingest_reported`)
        if isinstance(message, TelemetryWindow):
            self._telemetry_changed(message.device_id)
        elif isinstance(message, ReportedState) and message.status is DeviceStatus.ONLINE:
            # An agent reports on every connect; one that lost its seq counter settles on this answer, so it is
            # sent at once (not throttled) and is never older than what is stored (the retained one may be).
            self._acknowledge(message.device_id)

    def _apply(self, message: Message, *, live: bool = True) -> Any:
        """Store one decoded message; `UnknownDeviceError` when its device is not enrolled."""
        if isinstance(message, ReportedState):
            return self._with_session(lambda s: ingest_reported(session=s, state=message, live=live))
        if isinstance(message, DeviceEvent):
            return self._with_session(lambda s: ingest_event(session=s, event=message, live=live))
        assert isinstance(message, TelemetryWindow)
        return self._with_session(
            lambda s: ingest_telemetry(session=s, window=message, live=live, bucket_s=self._bucket_s)
        )

    def _heard(self, device_id: str) -> None:
        """A device spoke on a live session: `unknown` (not heard since this start) becomes `online`, once."""
        if device_id not in self._confirmed:
            self._with_session(lambda s: confirm_heard(session=s, device_id=device_id))
            self._confirmed.add(device_id)

    def _with_session(self, apply: Callable[[Session], Any]) -> Any:
        """Run `apply` in a fresh session, waiting out a database outage (`DatabaseUnavailableError` on stop)."""
        return self._database.run(apply)

    # -- telemetry acknowledgements (worker thread) ----------------------------------------------

    def _telemetry_changed(self, device_id: str) -> None:
        """Acknowledge `device_id`'s telemetry now, or once its throttle interval is over."""
        if self._acks.stored(device_id, time.monotonic()):
            self._acknowledge(device_id)

    def _acknowledge_due(self) -> None:
        self._acknowledge_many(self._acks.due(time.monotonic()))

    def _acknowledge_many(self, device_ids: list[str]) -> None:
        """Acknowledge `device_ids` with one transaction; after a failure one by one, so one cannot stop the rest."""
        if len(device_ids) > 1:
            try:
                answers = self._with_session(lambda s: acknowledge_devices(s, device_ids, grace_s=self._gap_grace_s))
            except DatabaseUnavailableError:
                raise
            except IntegrityError as exc:  # another ingest process settled one of them first (a chain row)
                log.info("telemetry acknowledgements raced another process (%s); one by one", type(exc.orig).__name__)
            except Exception:
                log.exception("telemetry acknowledgements failed devices=%d; one by one", len(device_ids))
            else:
                for device_id, answer in answers.items():
                    self._publish_ack(device_id, answer)
                return
        for device_id in device_ids:
            try:
                try:
                    self._acknowledge(device_id)
                except IntegrityError:  # raced another ingest process: the row it made is there now
                    self._acknowledge(device_id)
            except DatabaseUnavailableError:
                raise
            except Exception:  # a bug must not end the worker; the next stored window acknowledges again
                log.exception("telemetry acknowledgement failed device=%s", device_id)

    def _acknowledge(self, device_id: str) -> None:
        """Publish what is stored of `device_id`'s telemetry, retained (`protocol.TelemetryAck`).

        Settling the chain may report a gap; a hole still in its grace period is looked at again when it ends.
        """
        answer = self._with_session(lambda s: acknowledge_telemetry(s, device_id, grace_s=self._gap_grace_s))
        self._publish_ack(device_id, answer)

    def _publish_ack(self, device_id: str, answer: Acknowledgement) -> None:
        if answer.recheck_s is not None:
            self._acks.recheck(device_id, time.monotonic() + answer.recheck_s)
        self._client.publish(self.topics.ack(device_id), encode(answer.ack), qos=1, retain=True)
        self.counters.acknowledged()
