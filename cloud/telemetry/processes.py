"""Telemetry ingest over several processes: the coordinator's N-1 extra ingest processes, supervised.

With `Settings.ingest_processes` N > 1 the coordinator's own bridge and N-1 processes (`python -m
cloud.telemetry.worker`, each an `MqttBridge` restricted to telemetry) take telemetry through one MQTT shared
subscription, `$share/<group>/<base>/devices/+/telemetry`: the broker hands each window to one member, so decoding,
storing and acknowledging run on as many cores. Exactly once still holds by the database's unique (device, seq).

Each member has a persistent session of its own (client id `<bridge id>-ingest-<i>`). Mosquitto keeps handing a
member whose connection is gone its share of the messages, queued in its session, and redelivers what it had not
acknowledged when the same client id comes back: a member that dies is restarted with the same id (backoff 1 s
doubling to 30 s, reset once it ran 30 s), so its windows are stored late, not lost (the agents' outboxes resend
what stays unconfirmed in any case). When N shrinks, the sessions of the members that no longer run are ended at
start (a clean connect), or their share would wait for them forever; the N of the last start is kept in
`data_dir/ingest.json`.

A member's logs (JSON lines on its stderr) are logged by the coordinator under the member's logger names, with
`ingest_process=<i>`; its counters' growth (JSON lines on its stdout) is added to the coordinator's
`IngestCounters`, so `/api/v1/stats` and `/metrics` count every process (what a killed member counted in its last
half second is lost; the database is not). A member's stdin is a pipe it reads until it ends: when the coordinator
stops (closes it) or dies (the pipe closes with it), the member stops.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from cloud.bridge import BridgeTls, broker_addresses
from cloud.telemetry.counters import IngestCounters
from cloud.telemetry.worker import WorkerConfig
from protocol.mqtt import BrokerAddress

__all__ = [
    "IngestProcesses",
    "member_client_id",
    "plan_ingest",
    "previous_processes",
    "remember_processes",
    "retire_sessions",
    "share_group",
    "worker_configs",
]

log = logging.getLogger(__name__)

STATE_FILE = "ingest.json"
_STOP_GRACE_S = 15.0  # a member drains its batch and stops its bridge (up to 10 s) before it is killed
_STABLE_S = 30.0


def share_group(client_id: str) -> str:
    """The shared subscription group of a coordinator: its bridge's client id, in the characters a group may use."""
    return re.sub(r"[^A-Za-z0-9_.-]", "-", client_id)


def member_client_id(client_id: str, index: int) -> str:
    """The persistent client id of ingest process `index` (1..N-1) of the bridge `client_id`."""
    return f"{client_id}-ingest-{index}"


def previous_processes(data_dir: Path) -> int:
    """`ingest_processes` at the last start (1 when never recorded or unreadable)."""
    try:
        return max(1, int(json.loads((data_dir / STATE_FILE).read_text())["processes"]))
    except (OSError, ValueError, KeyError, TypeError):
        return 1


def remember_processes(data_dir: Path, processes: int) -> None:
    """Record `processes` for the next start (`previous_processes`)."""
    path = data_dir / STATE_FILE
    temp = path.with_suffix(".tmp")
    temp.write_text(json.dumps({"processes": processes}) + "\n")
    temp.replace(path)


def retire_sessions(url: str, tls: BridgeTls | None, client_ids: Sequence[str], timeout_s: float = 10.0) -> None:
    """End the broker sessions of `client_ids` (connect with a clean session, then leave), so that the shared
    subscription no longer queues messages for members that will not run again. With several brokers (`url` a
    comma-separated list) on each of them: a member may have held its session on any node. A failure is logged."""
    for address in broker_addresses(url):
        for client_id in client_ids:
            _retire_session(address, tls, client_id, timeout_s)


def _retire_session(address: BrokerAddress, tls: BridgeTls | None, client_id: str, timeout_s: float) -> None:
    client = mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=True)
    if address.tls:
        if tls is None:
            client.tls_set()
        else:
            client.tls_set(ca_certs=str(tls.ca), certfile=str(tls.cert), keyfile=str(tls.key))
    if address.username is not None:
        client.username_pw_set(address.username, address.password)
    connected = threading.Event()
    client.on_connect = lambda *_args, done=connected: done.set()
    broker = f"{address.host}:{address.port}"
    try:
        client.connect(address.host, address.port)
        client.loop_start()
        if connected.wait(timeout_s):
            log.info(
                "ingest session ended client_id=%s broker=%s (fewer ingest processes than at the last start)",
                client_id,
                broker,
            )
        else:
            log.warning("could not end the ingest session client_id=%s broker=%s: no answer", client_id, broker)
        client.disconnect()
    except OSError as exc:
        log.warning("could not end the ingest session client_id=%s broker=%s: %s", client_id, broker, exc)
    finally:
        client.loop_stop()


class IngestProcesses:
    """The extra ingest processes of a coordinator: started, restarted with backoff when one dies, stopped with it."""

    def __init__(
        self,
        configs: Sequence[WorkerConfig],
        counters: IngestCounters,
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        self._members = [_Member(config, counters, min_backoff_s, max_backoff_s) for config in configs]

    def start(self) -> None:
        """Start every member (each supervised by a thread of its own)."""
        for member in self._members:
            member.start()

    def stop(self) -> None:
        """Stop every member: its stdin closed, SIGKILL after a grace period."""
        for member in self._members:
            member.ask_stop()
        for member in self._members:
            member.join()

    @property
    def pids(self) -> list[int | None]:
        """The running members' pids, by index (None while one is restarting)."""
        return [member.pid for member in self._members]

    @property
    def stored(self) -> list[int]:
        """Telemetry windows each member reported stored (since this coordinator started it)."""
        return [member.stored for member in self._members]

    @property
    def starts(self) -> list[int]:
        """How many times each member was started (1 + restarts)."""
        return [member.starts for member in self._members]


class _Member:
    """One ingest process and the thread supervising it (every operation on the process is on that thread)."""

    def __init__(self, config: WorkerConfig, counters: IngestCounters, min_backoff_s: float, max_backoff_s: float):
        self.config = config
        self._counters = counters
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.starts = 0
        self.stored = 0

    @property
    def pid(self) -> int | None:
        proc = self._proc
        return proc.pid if proc is not None and proc.poll() is None else None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name=f"ingest-{self.config.index}", daemon=True)
        self._thread.start()

    def ask_stop(self) -> None:
        self._stop.set()

    def join(self) -> None:
        if self._thread is not None:
            self._thread.join(_STOP_GRACE_S + 5)
            self._thread = None

    def _supervise(self) -> None:
        backoff = self._min_backoff_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as exc:
                log.error("cannot start ingest process %d: %s; retrying in %.0fs", self.config.index, exc, backoff)
            else:
                while proc.poll() is None and not self._stop.wait(0.2):
                    pass
                if self._stop.is_set():
                    self._terminate(proc)
                    return
                if time.monotonic() - started > _STABLE_S:
                    backoff = self._min_backoff_s
                log.warning(
                    "ingest process %d exited code=%s pid=%d; restarting in %.0fs",
                    self.config.index,
                    proc.returncode,
                    proc.pid,
                    backoff,
                )
            if self._stop.wait(backoff):
                return
            backoff = min(backoff * 2, self._max_backoff_s)

    def _spawn(self) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "cloud.telemetry.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        self._proc = proc
        self.starts += 1
        index = self.config.index
        threading.Thread(
            target=self._read_counters, args=(proc.stdout,), name=f"ingest-{index}-out", daemon=True
        ).start()
        threading.Thread(target=_relog, args=(proc.stderr, index), name=f"ingest-{index}-log", daemon=True).start()
        try:
            proc.stdin.write(self.config.model_dump_json().encode() + b"\n")
            proc.stdin.flush()  # stdin stays open: its end tells the process to stop
        except BrokenPipeError:
            pass  # died at once: seen as an exit
        log.info("ingest process %d started pid=%d", index, proc.pid)
        return proc

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """Close its stdin (it stops its bridge and exits); SIGKILL after the grace period."""
        assert proc.stdin is not None
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(_STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            log.warning(
                "ingest process %d pid=%d did not stop in %.0fs; killing it", self.config.index, proc.pid, _STOP_GRACE_S
            )
            proc.kill()
            proc.wait()
        log.info("ingest process %d stopped pid=%d code=%s", self.config.index, proc.pid, proc.returncode)

    def _read_counters(self, stdout: IO[bytes]) -> None:
        for line in stdout:
            try:
                delta = json.loads(line)["counters"]
                self._counters.add(delta)
                self.stored += int(delta.get("stored", {}).get("telemetry", 0))
            except (ValueError, KeyError, TypeError) as exc:
                log.warning("ingest process %d wrote an unreadable report (%s): %.200r", self.config.index, exc, line)


def _relog(stderr: IO[bytes], index: int) -> None:
    """Log a member's JSON log lines as the coordinator's own (other lines, e.g. a crash before logging was set up,
    as warnings)."""
    for raw in stderr:
        line = raw.decode(errors="replace").rstrip()
        if not line:
            continue
        try:
            fields = json.loads(line)
            level = logging.getLevelName(str(fields["level"]).upper())
            logger, message = str(fields["logger"]), str(fields["msg"])
        except (ValueError, KeyError, TypeError):
            logging.getLogger(__name__).warning("ingest process %d: %s", index, line)
            continue
        if fields.get("exc"):
            message = f"{message}\n{fields['exc']}"
        logging.getLogger(logger).log(
            level if isinstance(level, int) else logging.INFO, "%s ingest_process=%d", message, index
        )


def worker_configs(
    *,
    processes: int,
    url: str,
    topic_base: str,
    database_url: str,
    client_id: str,
    tls: BridgeTls | None,
    gap_grace_s: float,
    batch_max: int,
    batch_wait_s: float,
    bucket_s: int,
    log_level: str | None = None,
) -> list[WorkerConfig]:
    """The configurations of ingest processes 1..`processes`-1 of the bridge `client_id`."""
    level = log_level or logging.getLevelName(logging.getLogger().getEffectiveLevel())
    return [
        WorkerConfig(
            index=index,
            url=url,
            topic_base=topic_base,
            database_url=database_url,
            client_id=member_client_id(client_id, index),
            share_group=share_group(client_id),
            tls_ca=None if tls is None else str(tls.ca),
            tls_cert=None if tls is None else str(tls.cert),
            tls_key=None if tls is None else str(tls.key),
            gap_grace_s=gap_grace_s,
            batch_max=batch_max,
            batch_wait_s=batch_wait_s,
            bucket_s=bucket_s,
            log_level=level if isinstance(level, str) else "INFO",
        )
        for index in range(1, processes)
    ]


def plan_ingest(
    *,
    processes: int,
    previous: int,
    url: str,
    tls: BridgeTls | None,
    client_id: str,
    counters: IngestCounters,
    **bridge: Any,
) -> tuple[str | None, IngestProcesses | None]:
    """The share group for the coordinator's own bridge (None: it touches no shared subscription, as with one process
    ever) and its extra ingest processes (None with one; not started), after ending the broker sessions of members
    that ran at the last start (`previous` processes) and no longer will. `bridge`: the `worker_configs` settings
    (topic_base, database_url, gap_grace_s, batch_max, batch_wait_s, bucket_s)."""
    if previous > processes:
        retire_sessions(url, tls, [member_client_id(client_id, index) for index in range(processes, previous)])
    group = share_group(client_id) if max(processes, previous) > 1 else None
    if processes == 1:
        return group, None
    configs = worker_configs(processes=processes, url=url, client_id=client_id, tls=tls, **bridge)
    return group, IngestProcesses(configs, counters)
