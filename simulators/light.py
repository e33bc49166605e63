"""Light simulated devices: thousands of real MQTT sessions per process, without an inference runtime.

A light device does on the wire what a real agent does on an update (`agent.daemon`, `agent.update`), minus
inference: it enrols with the coordinator (`agent.identity.enrol`, here with a fleet bootstrap secret so that
10,000 devices need no operator token each), connects to the fleet broker with its own certificate, reports
`online` and `agent.started`, and on a new desired state walks the agent's phases — downloading, verifying,
staging, loading, health_check, shadow, switching, committing, active — publishing at each the same event an
agent publishes, and the retained `ReportedState` through the agent's own `agent.reporting.ReportCoalescer`
(at most one per interval in the middle of an update, the end of it at once). The artifact is
really downloaded over HTTP (httpx, the URL and token the desired state names) and its size and sha256
really checked; it is never loaded.

One process holds thousands of devices: their paho clients are driven by ONE `selectors` loop (epoll) through
paho's external-loop API (`socket()`, `loop_read/loop_write/loop_misc`, the socket register callbacks); paho's
own loop waits with `select()`, which breaks above file descriptor 1023. Downloads run in a small thread pool
and hand their result back to the loop. `LightFleet` splits a fleet over worker processes
(`python -m simulators.light`), each printing `ready` once its devices reported, and its figures as one JSON
line when its stdin closes.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import heapq
import json
import logging
import os
import platform
import queue
import random
import resource
import selectors
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from agent.credentials import tls_context
from agent.errors import TransportError
from agent.identity import DeviceIdentity, enrol, load_identity
from agent.reporting import DEFAULT_REPORT_INTERVAL_S, ReportCoalescer, must_flush
from protocol import (
    Capabilities,
    DesiredState,
    DeviceEvent,
    DeviceStatus,
    ErrorCode,
    ErrorInfo,
    EventKind,
    MalformedMessageError,
    ModelRef,
    ModelSpec,
    Predictions,
    ReportedState,
    SketchSet,
    TelemetryWindow,
    Topics,
    UpdatePhase,
    UpdateStatus,
    WindowSketches,
    decode,
    encode,
)
from protocol.mqtt import parse_mqtt_urls
from protocol.telemetry import LATENCY_BUCKETS_MS

__all__ = [
    "LIGHT_AGENT_VERSION",
    "LightDevice",
    "LightFleet",
    "LightFleetResult",
    "raise_open_files_limit",
    "window_sketches",
]

log = logging.getLogger(__name__)

LIGHT_AGENT_VERSION = "light-sim"
# The phases a real agent steps through after the download, each reported with an `update.progress` event.
_AFTER_DOWNLOAD = (
    UpdatePhase.VERIFYING,
    UpdatePhase.STAGING,
    UpdatePhase.LOADING,
    UpdatePhase.HEALTH_CHECK,
    UpdatePhase.SHADOW,
    UpdatePhase.SWITCHING,
    UpdatePhase.COMMITTING,
)
_KEEPALIVE_S = 30
_MISC_EVERY_S = 1.0
_RECONNECT_S = 1.0
_ENROL_ATTEMPTS = 5
_ENROL_THREADS = 2  # per process: the coordinator enrols one device at a time on SQLite anyway
_STDIN = "stdin"  # selector key data of the worker's stdin
# Telemetry (`--telemetry-s`): what the default agent sends a window of 100 calls, 1 call in 8 sketched.
_WINDOW_CALLS = 100
_WINDOW_SKETCH_ROWS = 12
_SKETCH_VARIANTS = 8
_CAPABILITIES = Capabilities(
    runtimes=["onnxruntime"], arch=platform.machine(), cpu_features=["avx2"], memory_mb=1024, os="linux"
)


def raise_open_files_limit() -> int:
    """Raise this process's RLIMIT_NOFILE soft limit to the hard limit; returns the new soft limit."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


@dataclass
class LightDevice:
    """One light device: its MQTT client and the update state a real agent would persist."""

    identity: DeviceIdentity
    topics: Topics
    client: mqtt.Client
    reports: ReportCoalescer = field(init=False)  # set by `_Loop.add`: it publishes through the loop
    generation: int | None = None
    phase: UpdatePhase = UpdatePhase.IDLE
    target: ModelSpec | None = None
    active: ModelRef | None = None
    error: ErrorInfo | None = None
    downloads: int = 0
    bytes_received: int = 0
    events_sent: int = 0
    connected: bool = False
    started: bool = False  # `agent.started` sent (once per process, as an agent does per start)
    # Telemetry (only with a telemetry interval): the next window's seq, windows published, and per window the
    # publish wall time (epoch s) and its PUBACK round trip (ms): the broker's share of the ingest lag.
    next_seq: int | None = None
    windows_sent: int = 0
    pubacks: list[tuple[float, float]] = field(default_factory=list)
    unacked: dict[int, tuple[float, float]] = field(default_factory=dict)

    @property
    def device_id(self) -> str:
        """The device's id (the certificate's CN)."""
        return self.identity.device_id

    def status(self) -> UpdateStatus | None:
        """The `UpdateStatus` an agent reports for its current state; None before any desired state."""
        if self.generation is None:
            return None
        target = self.target.ref if self.target is not None else None
        return UpdateStatus(generation=self.generation, phase=self.phase, target=target, error=self.error)

    def reported(self, status: DeviceStatus = DeviceStatus.ONLINE) -> ReportedState:
        """The reported state an agent publishes now (no inference endpoint)."""
        return ReportedState(
            device_id=self.device_id,
            status=status,
            active_model=self.active,
            update=self.status(),
            tags=self.identity.tags,
            agent_version=LIGHT_AGENT_VERSION,
            capabilities=_CAPABILITIES,
        )


@dataclass(frozen=True)
class _Downloaded:
    device: LightDevice
    generation: int
    body: bytes | None
    error: str | None


class _Loop:
    """The devices of one process on one epoll loop."""

    def __init__(
        self,
        devices_dir: Path,
        *,
        trial_s: float,
        download_threads: int,
        telemetry_s: float = 0.0,
        report_interval_s: float = DEFAULT_REPORT_INTERVAL_S,
    ) -> None:
        self.devices_dir = devices_dir
        self.trial_s = trial_s
        self.report_interval_s = report_interval_s
        self.telemetry_s = telemetry_s
        self._sketches = window_sketches(_WINDOW_SKETCH_ROWS, _SKETCH_VARIANTS) if telemetry_s > 0 else []
        self.selector = selectors.DefaultSelector()
        self.devices: list[LightDevice] = []
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._timer_seq = 0
        self._done: queue.SimpleQueue[_Downloaded] = queue.SimpleQueue()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._http = httpx.Client(
            timeout=60,
            limits=httpx.Limits(max_connections=download_threads),
            follow_redirects=True,  # artifact_base_url: the bytes come from object storage (sha256 checked below)
        )
        self._pool = ThreadPoolExecutor(max_workers=download_threads, thread_name_prefix="light-download")
        self.stopping = False
        self.stdin_closed = False
        self._next_misc = time.monotonic() + _MISC_EVERY_S

    # -- devices and their clients ------------------------------------------------------------------

    def add(self, identity: DeviceIdentity) -> LightDevice:
        """A client for `identity` (persistent session, offline will, its certificate), connected now."""
        # A light device stays on the first broker the coordinator named (no failover: the bench measures the
        # coordinator, and a light fleet on a cluster would only spread its sessions).
        address = parse_mqtt_urls(identity.broker_url)[0]
        topics = Topics(identity.topic_base)
        client = mqtt.Client(
            callback_api_version=CallbackAPIVersion.VERSION2,
            client_id=identity.device_id,  # an enrolled device connects as itself
            clean_session=False,
            protocol=mqtt.MQTTv311,
        )
        device = LightDevice(identity=identity, topics=topics, client=client)
        device.reports = ReportCoalescer(
            lambda: self._publish_report(device), interval_s=self.report_interval_s, schedule=self._schedule
        )
        offline = ReportedState(device_id=identity.device_id, status=DeviceStatus.OFFLINE, tags=identity.tags)
        client.will_set(topics.reported(identity.device_id), encode(offline), qos=1, retain=True)
        client.max_queued_messages_set(1000)
        if address.tls:
            client.tls_set_context(tls_context(identity))
        client.user_data_set(device)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_socket_open = self._on_socket_open
        client.on_socket_close = self._on_socket_close
        client.on_socket_register_write = self._on_register_write
        client.on_socket_unregister_write = self._on_unregister_write
        if self.telemetry_s > 0:
            client.on_publish = self._on_publish
        self.devices.append(device)
        client.connect(address.host, address.port, keepalive=_KEEPALIVE_S)  # TCP + TLS now; CONNECT queued
        return device

    def _on_socket_open(self, client: mqtt.Client, device: LightDevice, sock: Any) -> None:
        self.selector.register(sock, selectors.EVENT_READ, client)

    def _on_socket_close(self, client: mqtt.Client, device: LightDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(sock)

    def _on_register_write(self, client: mqtt.Client, device: LightDevice, sock: Any) -> None:
        self.selector.modify(sock, selectors.EVENT_READ | selectors.EVENT_WRITE, client)

    def _on_unregister_write(self, client: mqtt.Client, device: LightDevice, sock: Any) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.selector.modify(sock, selectors.EVENT_READ, client)

    def _on_connect(self, client: mqtt.Client, device: LightDevice, _flags: Any, reason: Any, _props: Any) -> None:
        if reason.is_failure:
            log.warning("%s: connection refused: %s", device.device_id, reason)
            return
        device.connected = True
        client.subscribe(device.topics.desired(device.device_id), qos=1)
        client.subscribe(device.topics.ack(device.device_id), qos=1)
        if not device.started:
            device.started = True
            self._event(device, EventKind.AGENT_STARTED, message=f"agent {LIGHT_AGENT_VERSION} started")
        self._report(device)
        if self.telemetry_s > 0 and device.next_seq is None:
            self._start_telemetry(device)

    def _on_disconnect(self, client: mqtt.Client, device: LightDevice, _f: Any, reason: Any, _p: Any) -> None:
        device.connected = False
        if not self.stopping:
            log.warning("%s: disconnected (%s); reconnecting", device.device_id, reason)
            self.later(_RECONNECT_S, lambda: self._reconnect(device))

    def _reconnect(self, device: LightDevice) -> None:
        if self.stopping or device.connected:
            return
        try:
            device.client.reconnect()
        except OSError as exc:
            log.warning("%s: reconnect failed (%s); again later", device.device_id, exc)
            self.later(_RECONNECT_S, lambda: self._reconnect(device))

    # -- what an agent publishes ---------------------------------------------------------------------

    def _report(self, device: LightDevice, *, coalesce: bool = False) -> None:
        """The agent's `_report`: the reported state now, or with `coalesce` at most once per report interval."""
        if coalesce:
            device.reports.report()
        else:
            device.reports.flush()

    def _publish_report(self, device: LightDevice) -> None:
        topic = device.topics.reported(device.device_id)
        device.client.publish(topic, encode(device.reported()), qos=1, retain=True)

    def _schedule(self, delay_s: float, action: Callable[[], None]) -> None:
        """The coalescers' trailing reports, on this loop's timers (one thread: nothing to cancel)."""
        self.later(delay_s, action)

    def _event(self, device: LightDevice, kind: EventKind, **fields: Any) -> None:
        event = DeviceEvent(device_id=device.device_id, kind=kind, **fields)
        device.client.publish(device.topics.events(device.device_id), encode(event), qos=1)
        device.events_sent += 1

    def _enter(self, device: LightDevice, phase: UpdatePhase, *, started: bool = False) -> None:
        """A transition, reported as the agent's `_on_transition` does: its event, then the reported state."""
        device.phase = phase
        target = f"{device.target.name}:{device.target.version}" if device.target else "nothing"
        if phase in (UpdatePhase.FAILED, UpdatePhase.ROLLED_BACK):
            kind = EventKind.UPDATE_FAILED
        elif phase is UpdatePhase.ACTIVE:
            kind = EventKind.UPDATE_ACTIVATED
        else:
            kind = EventKind.UPDATE_STARTED if started else EventKind.UPDATE_PROGRESS
        self._event(
            device,
            kind,
            generation=device.generation,
            phase=phase,
            message=f"{phase.value} {target}",
            error=device.error,
        )
        self._report(device, coalesce=not must_flush(phase))

    # -- telemetry (an addition: only with a telemetry interval) --------------------------------------------

    def _start_telemetry(self, device: LightDevice) -> None:
        """Windows every `telemetry_s` from a random phase; seqs start at the epoch second, so a device restarted
        later (a new process) never reuses one (its first window carries no `prev_seq`: a declared jump)."""
        device.next_seq = int(time.time())
        self.later(random.uniform(0, self.telemetry_s), lambda: self._send_window(device))

    def _send_window(self, device: LightDevice) -> None:
        if self.stopping or device.next_seq is None:
            return
        seq, now = device.next_seq, datetime.now(UTC)
        window = TelemetryWindow(
            device_id=device.device_id,
            seq=seq,
            prev_seq=seq - 1 if device.windows_sent else None,
            window_start=now - timedelta(seconds=self.telemetry_s),
            window_end=now,  # the publish time: the coordinator's `received_at` minus this is the ingest lag
            model=device.active,
            inference_count=_WINDOW_CALLS,
            error_count=0,
            latency_histogram=_latency_histogram(seq),
            class_counts={str(seq % 10): 60, "1": 40},
            sketches=self._sketches[seq % len(self._sketches)],
        )
        info = device.client.publish(device.topics.telemetry(device.device_id), encode(window), qos=1)
        device.unacked[info.mid] = (now.timestamp(), time.monotonic())
        device.next_seq, device.windows_sent = seq + 1, device.windows_sent + 1
        self.later(self.telemetry_s, lambda: self._send_window(device))

    def _on_publish(self, client: mqtt.Client, device: LightDevice, mid: int, _reason: Any, _props: Any) -> None:
        sent = device.unacked.pop(mid, None)
        if sent is not None:
            device.pubacks.append((round(sent[0], 3), round((time.monotonic() - sent[1]) * 1000, 2)))

    # -- the update path ------------------------------------------------------------------------------

    def _on_message(self, client: mqtt.Client, device: LightDevice, message: mqtt.MQTTMessage) -> None:
        if message.topic != device.topics.desired(device.device_id) or not message.payload:
            return  # telemetry acks: a light device never resends a window, so it ignores them
        try:
            desired = decode(DesiredState, bytes(message.payload))
        except MalformedMessageError as exc:
            log.warning("%s: malformed desired state: %s", device.device_id, exc)
            return
        if desired.device_id != device.device_id:
            return
        self._desired(device, desired)

    def _desired(self, device: LightDevice, desired: DesiredState) -> None:
        """The agent's `machine._on_desired`: stale generations ignored, the active model confirmed, else download."""
        if device.generation is not None and desired.generation <= device.generation:
            return
        in_progress = device.phase not in (UpdatePhase.IDLE, UpdatePhase.ACTIVE, UpdatePhase.FAILED)
        device.generation, device.error = desired.generation, None
        model = desired.model
        if model is None:
            device.phase, device.target = UpdatePhase.IDLE, None
            self._report(device)
            return
        if model.ref == device.active:
            device.target = model
            self._enter(device, UpdatePhase.ACTIVE)
            return
        if in_progress and device.target is not None and device.target.ref == model.ref:
            device.target = model  # a newer generation of the same model: the update goes on
            self._report(device, coalesce=True)
            return
        device.target = model
        self._enter(device, UpdatePhase.DOWNLOADING, started=True)
        generation = desired.generation
        future = self._pool.submit(self._download, model.artifact.url)
        future.add_done_callback(lambda f: self._finished(device, generation, f))

    def _download(self, url: str) -> bytes:
        response = self._http.get(url)
        response.raise_for_status()
        return response.content

    def _finished(self, device: LightDevice, generation: int, future: Future[bytes]) -> None:
        """In a download thread: hand the result to the loop."""
        try:
            self._done.put(_Downloaded(device, generation, future.result(), None))
        except Exception as exc:  # any failure is the device's download failure, reported by the loop
            self._done.put(_Downloaded(device, generation, None, f"{type(exc).__name__}: {exc}"))
        with contextlib.suppress(BlockingIOError):  # full: the loop is being woken already
            self._wake_w.send(b"x")

    def _downloaded(self, done: _Downloaded) -> None:
        device = done.device
        if device.generation != done.generation or device.phase is not UpdatePhase.DOWNLOADING:
            return  # superseded meanwhile
        target = device.target
        assert target is not None
        device.downloads += 1
        if done.body is None:
            device.error = ErrorInfo.of(ErrorCode.DOWNLOAD_FAILED, f"GET {target.artifact.url} failed: {done.error}")
            self._enter(device, UpdatePhase.FAILED)
            return
        device.bytes_received += len(done.body)
        self._enter(device, UpdatePhase.VERIFYING)
        problem = _verify(done.body, target)
        if problem is not None:
            device.error = problem
            self._enter(device, UpdatePhase.FAILED)
            return
        for phase in _AFTER_DOWNLOAD[1:]:
            if phase is UpdatePhase.COMMITTING:
                device.active = target.ref  # switched: the new model serves on trial
            self._enter(device, phase)
        if self.trial_s > 0:
            self.later(self.trial_s, lambda: self._commit(device, done.generation))
        else:
            self._commit(device, done.generation)

    def _commit(self, device: LightDevice, generation: int) -> None:
        if device.generation == generation and device.phase is UpdatePhase.COMMITTING:
            self._enter(device, UpdatePhase.ACTIVE)

    # -- the loop ---------------------------------------------------------------------------------------

    def later(self, delay_s: float, action: Callable[[], None]) -> None:
        """Run `action` on the loop after `delay_s` seconds."""
        self._timer_seq += 1
        heapq.heappush(self._timers, (time.monotonic() + delay_s, self._timer_seq, action))

    def run_once(self, timeout: float) -> None:
        """Wait for sockets (at most `timeout` s or the next timer), then serve them, downloads and timers."""
        now = time.monotonic()
        if self._timers:
            timeout = max(0.0, min(timeout, self._timers[0][0] - now))
        for key, mask in self.selector.select(timeout):
            client = key.data
            if client is None:
                try:
                    while self._wake_r.recv(4096):
                        pass
                except BlockingIOError:
                    pass
                continue
            if client is _STDIN:
                if not os.read(key.fd, 4096):  # the parent closed our stdin: time to stop
                    self.selector.unregister(key.fileobj)
                    self.stdin_closed = True
                continue
            if mask & selectors.EVENT_READ:
                client.loop_read()
            if mask & selectors.EVENT_WRITE and client.socket() is not None:
                client.loop_write()
        while True:
            try:
                self._downloaded(self._done.get_nowait())
            except queue.Empty:
                break
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, action = heapq.heappop(self._timers)
            action()
        if now >= self._next_misc:  # keepalives, also while thousands are still connecting one by one
            self._next_misc = now + _MISC_EVERY_S
            for device in self.devices:
                device.client.loop_misc()

    def run(self, until: Callable[[], bool]) -> None:
        """Serve until `until()` is true."""
        while not until():
            self.run_once(0.2)

    def close(self) -> None:
        """Disconnect every device cleanly (no last will), flushing what is queued, and stop the downloads."""
        self.stopping = True
        for device in self.devices:
            if device.reports.pending:  # the retained state stays the device's current one
                device.reports.flush()
            device.reports.close()
            device.client.disconnect()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(d.client.want_write() for d in self.devices):
            self.run_once(0.05)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._http.close()


def window_sketches(rows: int, variants: int) -> list[WindowSketches | None]:
    """`variants` different sketches of `rows` calls each (one row a call: the digits model's 64 inputs, its top-1
    probability and margin), as the default agent sends them; [None] for `rows` 0 (no sketches)."""
    if rows <= 0:
        return [None]
    rng = np.random.default_rng(0)
    out: list[WindowSketches | None] = []
    for _ in range(variants):
        sketches = SketchSet("input")
        for _ in range(rows):
            top1 = rng.uniform(0.3, 1.0, 1)
            sketches.update(rng.random((1, 64)), Predictions(top1=top1, margin=top1 * rng.uniform(0.0, 1.0, 1)))
        out.append(sketches.to_wire())
    return out


def _latency_histogram(seq: int) -> list[int]:
    """`_WINDOW_CALLS` latencies spread over a few middle buckets of `LATENCY_BUCKETS_MS`."""
    counts = [0] * (len(LATENCY_BUCKETS_MS) + 1)
    middle = len(counts) // 2
    for offset, count in zip((-1, 0, 1, 2), (20, 50, 25, 5), strict=True):
        counts[middle + offset + seq % 2] = count
    return counts


def _verify(body: bytes, spec: ModelSpec) -> ErrorInfo | None:
    """The agent's verification of a downloaded artifact (size, then sha256), on bytes in memory. Pure."""
    if len(body) != spec.artifact.size:
        return ErrorInfo.of(
            ErrorCode.ARTIFACT_SIZE_MISMATCH, f"artifact is {len(body)} bytes, expected {spec.artifact.size}"
        )
    actual = hashlib.sha256(body).hexdigest()
    if actual != spec.artifact.sha256:
        return ErrorInfo.of(ErrorCode.DIGEST_MISMATCH, f"artifact sha256 is {actual}, expected {spec.artifact.sha256}")
    return None


def _identity(data_dir: Path, coordinator_url: str, device_id: str, bootstrap_secret: str) -> DeviceIdentity:
    """The device's enrolled identity: loaded, or enrolled now with the bootstrap secret (the agent's own code)."""
    existing = load_identity(data_dir)
    if existing is not None:
        return existing
    for attempt in range(_ENROL_ATTEMPTS):
        try:
            return enrol(
                data_dir=data_dir,
                coordinator_url=coordinator_url,
                device_id=device_id,
                bootstrap_secret=bootstrap_secret,
                timeout_s=120,
            )
        except TransportError as exc:  # a coordinator busy enrolling thousands: as a device would, try again
            if attempt + 1 == _ENROL_ATTEMPTS:
                raise
            log.warning("%s: enrolment failed (%s); again in 2 s", device_id, exc)
            time.sleep(2)
    raise AssertionError("unreachable")


def worker_main(argv: Sequence[str]) -> None:
    """`python -m simulators.light ...`: enrol and connect these devices, `ready`, serve until stdin closes."""
    parser = argparse.ArgumentParser(description="light devices of one process")
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--bootstrap-secret", required=True)
    parser.add_argument("--data-dir", type=Path, required=True)
    parser.add_argument("--ids", required=True, help="file with one device id a line")
    parser.add_argument("--trial-s", type=float, default=0.0)
    parser.add_argument("--download-threads", type=int, default=8)
    parser.add_argument("--telemetry-s", type=float, default=0.0, help="a telemetry window every N s (0: none)")
    parser.add_argument(
        "--report-interval-s",
        type=float,
        default=DEFAULT_REPORT_INTERVAL_S,
        help="the agent's report_interval_s: least seconds between reported states mid-update (0: every change)",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s light %(levelname)s %(message)s")
    raise_open_files_limit()
    ids = Path(args.ids).read_text().split()
    loop = _Loop(
        args.data_dir,
        trial_s=args.trial_s,
        download_threads=args.download_threads,
        telemetry_s=args.telemetry_s,
        report_interval_s=args.report_interval_s,
    )
    enrol_pool = ThreadPoolExecutor(max_workers=_ENROL_THREADS)
    identities = list(
        enrol_pool.map(
            lambda ident: _identity(args.data_dir / ident, args.coordinator, ident, args.bootstrap_secret), ids
        )
    )
    enrol_pool.shutdown()
    for identity in identities:
        loop.add(identity)
        loop.run_once(0)
    deadline = time.monotonic() + 120
    loop.run(lambda: all(d.connected for d in loop.devices) or time.monotonic() > deadline)
    print("ready" if all(d.connected for d in loop.devices) else "not-ready", flush=True)
    loop.selector.register(sys.stdin.fileno(), selectors.EVENT_READ, _STDIN)
    loop.run(lambda: loop.stdin_closed)
    loop.close()
    figures = {
        d.device_id: {
            "downloads": d.downloads,
            "bytes": d.bytes_received,
            "phase": d.phase.value,
            "generation": d.generation,
            "active": d.active.model_dump(mode="json") if d.active else None,
            "windows_sent": d.windows_sent,
            "reports_sent": d.reports.published,
            "events_sent": d.events_sent,
            "pubacks": d.pubacks,
        }
        for d in loop.devices
    }
    print(json.dumps(figures), flush=True)


@dataclass
class LightFleetResult:
    """What the light devices of a fleet did, per device: downloads, bytes received, last phase, active model."""

    devices: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def downloads(self) -> int:
        """Artifact downloads of every device together."""
        return sum(int(d["downloads"]) for d in self.devices.values())

    @property
    def bytes_received(self) -> int:
        """Artifact bytes received by every device together."""
        return sum(int(d["bytes"]) for d in self.devices.values())

    @property
    def messages_sent(self) -> int:
        """Reported states and events every device published together (telemetry apart)."""
        return sum(int(d.get("reports_sent", 0)) + int(d.get("events_sent", 0)) for d in self.devices.values())

    @property
    def windows_sent(self) -> int:
        """Telemetry windows every device published together."""
        return sum(int(d.get("windows_sent", 0)) for d in self.devices.values())


class LightFleet:
    """Light devices `PREFIX-00000`... split over `processes` worker processes; `start()` returns once all reported."""

    def __init__(
        self,
        *,
        coordinator_url: str,
        bootstrap_secret: str,
        devices: int,
        data_root: Path,
        prefix: str = "light",
        processes: int = 1,
        trial_s: float = 0.0,
        telemetry_s: float = 0.0,
    ) -> None:
        """`telemetry_s`: each device publishes a telemetry window every that many seconds (0: none)."""
        self.coordinator_url = coordinator_url
        self.bootstrap_secret = bootstrap_secret
        self.device_ids = [f"{prefix}-{index:05d}" for index in range(devices)]
        self.data_root = data_root
        self.processes = max(1, min(processes, devices))
        self.trial_s = trial_s
        self.telemetry_s = telemetry_s
        self._procs: list[subprocess.Popen[str]] = []

    def start(self, timeout: float = 600) -> None:
        """Start the workers (each enrols its devices if needed and connects them) and wait for every `ready`."""
        self.data_root.mkdir(parents=True, exist_ok=True)
        share = -(-len(self.device_ids) // self.processes)
        for k in range(self.processes):
            ids = self.device_ids[k * share : (k + 1) * share]
            if not ids:
                break
            ids_file = self.data_root / f"worker-{k}.ids"
            ids_file.write_text("\n".join(ids) + "\n")
            command = [
                sys.executable, "-m", "simulators.light", "--coordinator", self.coordinator_url,
                "--bootstrap-secret", self.bootstrap_secret, "--data-dir", str(self.data_root),
                "--ids", str(ids_file), "--trial-s", str(self.trial_s),
            ]  # fmt: skip
            if self.telemetry_s > 0:
                command += ["--telemetry-s", str(self.telemetry_s)]
            self._procs.append(subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True))
        for proc in self._procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            if line != "ready":
                self.stop()
                raise RuntimeError(f"a light fleet worker did not get ready (said {line!r})")

    def stop(self, timeout: float = 60) -> LightFleetResult:
        """Close the workers' stdin; they disconnect and print their figures."""
        result = LightFleetResult()
        for proc in self._procs:
            assert proc.stdin is not None
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.close()
        for proc in self._procs:
            assert proc.stdout is not None
            out = proc.stdout.read()  # until the worker exits (its figures are its last line)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            for line in out.splitlines():
                if line.startswith("{"):
                    result.devices.update(json.loads(line))
        self._procs = []
        return result

    def __enter__(self) -> LightFleet:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    worker_main(sys.argv[1:])
