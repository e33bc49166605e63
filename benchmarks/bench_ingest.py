"""Telemetry ingest: windows/s the coordinator's MQTT bridge persists, against what a plain paho subscriber receives.

One Mosquitto (plain TCP, on a free port) for the whole run. M publisher processes send N QoS 1 telemetry payloads
(real `protocol.TelemetryWindow` JSON of D devices, each device's seqs in order with their `prev_seq`, carrying the
sketches the default agent sends: `--sketch-rows` inferences of the digits model each, ~6 kB a window for 100;
`--sketch-rows 0`: no sketches, ~0.4 kB, the figures before sketches existed):

- (a) baseline: a plain paho subscriber (QoS 1) counts them: messages/s from the first publish to the last received;
- (b) the same payloads through a real `cloud.bridge.MqttBridge` (its batched ingest, rollups, acknowledgements)
  into SQLite, and (c) into PostgreSQL (a fresh database per run, `EDGEFLEET_TEST_POSTGRES` or the local `test`
  server; skipped with a note when unreachable): windows/s from the first publish to the last window stored,
  and lost = published - rows stored (each device enrolled before the run), and the CPU time the bridge's process
  (the benchmark's own) spent per window stored between the first publish and the end.

Prints JSON with each rate and its ratio to (a).

- with `--processes 1,2` (the default) each database is run once per count: N ingest processes as the coordinator
  runs them (`Settings.ingest_processes`: its bridge plus N-1 `cloud.telemetry.worker` processes sharing telemetry
  through an MQTT shared subscription, `cloud.telemetry.processes.plan_ingest`); with N > 1 the end is when the
  last row is in the database (polled every 20 ms: the members report their counters every 0.5 s).

    python benchmarks/bench_ingest.py [--windows 20000] [--devices 100] [--publishers 2] [--no-postgres]
                                      [--batch-max 500] [--processes 1,2] [--sketch-rows 100]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from sqlalchemy import func, null, update
from sqlmodel import Session, select

from cloud.bridge import MqttBridge
from cloud.db import create_db_engine, init_db
from cloud.models import Device, EnrolmentState, TelemetryRecord
from cloud.telemetry.counters import IngestCounters
from cloud.telemetry.processes import plan_ingest
from protocol.codec import encode
from protocol.messages import ModelRef, TelemetryWindow
from protocol.topics import Topics
from simulators.brokers import plain_mosquitto
from simulators.light import window_sketches

POSTGRES_ADMIN = os.environ.get("EDGEFLEET_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
T0 = datetime(2026, 12, 1, tzinfo=UTC)
SKETCH_VARIANTS = 10


def device_ids(devices: int) -> list[str]:
    return [f"bench-{i:04d}" for i in range(devices)]


def payloads(base: str, ids: list[str], per_device: int, sketch_rows: int = 0) -> list[tuple[str, bytes]]:
    """Every device's windows, interleaved across devices as a fleet would send them (with the sketches of
    `sketch_rows` inferences each: 0, none)."""
    topics, model = Topics(base), ModelRef(name="digits", version="1.0", sha256="a" * 64)
    sketches = window_sketches(sketch_rows, SKETCH_VARIANTS)
    out = []
    for seq in range(per_device):
        for number, device_id in enumerate(ids):
            window = TelemetryWindow(
                device_id=device_id,
                seq=seq,
                prev_seq=seq - 1 if seq else None,
                window_start=T0 + timedelta(seconds=10 * seq),
                window_end=T0 + timedelta(seconds=10 * seq + 10),
                model=model,
                inference_count=100,
                error_count=seq % 3,
                latency_histogram=[10, 50, 30, 8, 2],
                class_counts={str(seq % 10): 60, "1": 40},
                sketches=sketches[(seq + number) % len(sketches)],
            )
            out.append((topics.telemetry(device_id), encode(window)))
    return out


def _client(client_id: str) -> mqtt.Client:
    return mqtt.Client(callback_api_version=CallbackAPIVersion.VERSION2, client_id=client_id)


def publisher(url: str, messages: list[tuple[str, bytes]], ready: Any, go: Any) -> None:
    """Publish `messages` at QoS 1 once `go` is set (a process of its own); waits for every PUBACK."""
    host, port = url.removeprefix("mqtt://").split(":")
    client = _client(f"pub-{uuid.uuid4().hex[:8]}")
    client.max_inflight_messages_set(100)
    client.max_queued_messages_set(0)
    client.connect(host, int(port))
    client.loop_start()
    ready.put(1)
    go.wait()
    infos = [client.publish(topic, payload, qos=1) for topic, payload in messages]
    for info in infos:
        info.wait_for_publish(120)
    client.disconnect()
    client.loop_stop()


def publish_all(url: str, messages: list[tuple[str, bytes]], publishers: int) -> tuple[float, list[Any]]:
    """Start `publishers` processes with their share of `messages`, release them together; (start time, procs)."""
    context = mp.get_context("spawn")
    ready, go = context.Queue(), context.Event()
    procs = [
        context.Process(target=publisher, args=(url, messages[i::publishers], ready, go)) for i in range(publishers)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        ready.get(timeout=60)
    start = time.monotonic()
    go.set()
    return start, procs


def wait(condition: Callable[[], bool], timeout: float, what: str, stall_s: float = 30.0) -> float:
    """Poll `condition`; the monotonic time it held. RuntimeError after `timeout`."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {what}")
        time.sleep(0.005)
    return time.monotonic()


def raw_rate(url: str, base: str, messages: list[tuple[str, bytes]], publishers: int) -> dict[str, float]:
    """(a) A plain paho subscriber at QoS 1: messages/s."""
    host, port = url.removeprefix("mqtt://").split(":")
    received, done, lock = [0], threading.Event(), threading.Lock()
    total = len(messages)

    def on_message(_c: Any, _u: Any, _m: Any) -> None:
        with lock:
            received[0] += 1
            if received[0] >= total:
                done.set()

    subscribed = threading.Event()
    client = _client(f"raw-{uuid.uuid4().hex[:8]}")
    client.on_message = on_message
    client.on_subscribe = lambda *_a: subscribed.set()
    client.connect(host, int(port))
    client.loop_start()
    client.subscribe(Topics(base).all_devices(Topics(base).parse(messages[0][0])[1]), qos=1)
    subscribed.wait(10)
    start, procs = publish_all(url, messages, publishers)
    if not done.wait(300):
        raise RuntimeError(f"raw subscriber got {received[0]} of {total}")
    end = time.monotonic()
    for proc in procs:
        proc.join(60)
    client.disconnect()
    client.loop_stop()
    return {"messages": total, "seconds": round(end - start, 3), "per_s": round(total / (end - start), 1)}


@contextmanager
def postgres_database() -> Iterator[str | None]:
    """A fresh PostgreSQL database (its SQLAlchemy URL), dropped afterwards; None when the server is unreachable."""
    try:
        import psycopg

        name = f"bench_ingest_{uuid.uuid4().hex[:10]}"
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True, connect_timeout=3) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
    except Exception as exc:
        print(f"PostgreSQL unavailable ({exc}); skipping it", file=sys.stderr)
        yield None
        return
    base = POSTGRES_ADMIN.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg://", 1)
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def bridge_rate(
    url: str,
    base: str,
    database_url: str,
    ids: list[str],
    messages: list[tuple[str, bytes]],
    publishers: int,
    batch_max: int = 500,
    processes: int = 1,
) -> dict[str, float]:
    """(b, c) The coordinator's bridge storing the same payloads: windows/s and lost windows."""
    engine = create_db_engine(database_url)
    init_db(engine)
    with Session(engine) as session:
        for device_id in ids:
            session.add(Device(id=device_id, enrolment=EnrolmentState.ENROLLED.value, tags={"site": "bench"}))
        session.flush()
        # SQL NULL, not JSON null: nothing to republish (as for a device enrolled through the API)
        session.connection().execute(update(Device).values(desired_state=null()))
        session.commit()
    counters = IngestCounters()
    client_id = f"bench-{uuid.uuid4().hex[:8]}"
    batching: dict[str, Any] = {"gap_grace_s": 120.0, "batch_max": batch_max, "batch_wait_s": 0.005, "bucket_s": 60}
    group, members = plan_ingest(
        processes=processes,
        previous=1,
        url=url,
        tls=None,
        client_id=client_id,
        counters=counters,
        topic_base=base,
        database_url=database_url,
        **batching,
    )
    bridge = MqttBridge(
        url=url,
        topics=Topics(base),
        engine=engine,
        counters=counters,
        client_id=client_id,
        share_group=group,
        share_telemetry=processes > 1,
        **batching,
    )
    bridge.start()
    if members is not None:
        members.start()
    try:
        if not bridge.wait_connected(10):
            raise RuntimeError("the bridge did not connect")
        wait(lambda: counters.snapshot()["connects"] >= processes, 60, "every ingest process connected")
        time.sleep(0.5)  # its subscriptions and the republish of (no) desired states
        total = len(messages)

        def handled() -> int:
            snapshot = counters.snapshot()
            return int(
                snapshot["stored"].get("telemetry", 0)
                + snapshot["duplicates_dropped"]
                + sum(snapshot["failed"].values())
                + sum(snapshot["rejected"].values())
            )

        def rows() -> int:
            time.sleep(0.015)
            with Session(engine) as session:
                return int(session.exec(select(func.count()).select_from(TelemetryRecord)).one())

        cpu = time.process_time()  # the bridge's process: paho's thread, the worker, this thread's polling
        start, procs = publish_all(url, messages, publishers)
        end = wait(lambda: handled() >= total if processes == 1 else rows() >= total, 600, "every window handled")
        cpu = time.process_time() - cpu
        for proc in procs:
            proc.join(60)
    finally:
        if members is not None:
            members.stop()
        bridge.stop()
    with Session(engine) as session:
        stored = int(session.exec(select(func.count()).select_from(TelemetryRecord)).one())
    engine.dispose()
    return {
        "windows": total,
        "stored": stored,
        "lost": total - stored,
        "seconds": round(end - start, 3),
        "per_s": round(stored / (end - start), 1),
        "processes": processes,
        # CPU of this process only (with processes > 1 the other members' is not in it): steadier than windows/s
        # on a loaded machine
        "process_cpu_us_per_window": round(cpu * 1e6 / max(1, stored), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--windows", type=int, default=20_000, help="telemetry windows in all (per run)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--publishers", type=int, default=2, help="publisher processes")
    parser.add_argument("--no-postgres", action="store_true")
    parser.add_argument("--batch-max", type=int, default=500, help="the bridge's ingest_batch_max (1: one by one)")
    parser.add_argument("--processes", default="1,2", help="ingest_processes counts to run, comma-separated")
    parser.add_argument(
        "--sketch-rows",
        type=int,
        default=100,
        help="inferences sketched per window (100: 10 a second over the agent's default 10 s window; 0: no sketches)",
    )
    args = parser.parse_args()
    ids = device_ids(args.devices)
    per_device = max(1, args.windows // args.devices)
    result: dict[str, Any] = {"devices": args.devices, "windows": per_device * args.devices}
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp, plain_mosquitto(Path(tmp) / "mosquitto") as url:
        base = f"bench/{uuid.uuid4().hex[:6]}/v1"
        messages = payloads(base, ids, per_device, args.sketch_rows)
        result["sketch_rows"], result["payload_bytes"] = args.sketch_rows, len(messages[0][1])
        result["raw_paho_qos1"] = raw = raw_rate(
            url, f"{base}-raw", _rebase(messages, base, f"{base}-raw"), args.publishers
        )
        print(f"raw: {raw}", file=sys.stderr)
        runs = [("sqlite", None)] + ([] if args.no_postgres else [("postgresql", "pg")])
        counts = [int(n) for n in args.processes.split(",")]
        for name, kind in runs:
            for processes in counts:
                with _database(kind, Path(tmp) / f"{name}-{processes}.db") as database_url:
                    if database_url is None:
                        continue
                    run_base = f"{base}-{name}-{processes}"
                    rebased = _rebase(messages, base, run_base)
                    figures = bridge_rate(
                        url, run_base, database_url, ids, rebased, args.publishers, args.batch_max, processes
                    )
                    figures["ratio_to_raw"] = round(figures["per_s"] / raw["per_s"], 3)
                    key = f"bridge_{name}" if processes == 1 else f"bridge_{name}_{processes}_processes"
                    result[key] = figures
                    print(f"{name} x{processes}: {figures}", file=sys.stderr)
    print(json.dumps(result, indent=2))


def _rebase(messages: list[tuple[str, bytes]], old: str, new: str) -> list[tuple[str, bytes]]:
    """The same payloads under another topic base (each run subscribes to its own)."""
    return [(new + topic[len(old) :], payload) for topic, payload in messages]


@contextmanager
def _database(kind: str | None, sqlite_path: Path) -> Iterator[str | None]:
    if kind is None:
        yield f"sqlite:///{sqlite_path}"
        return
    with postgres_database() as url:
        yield url


if __name__ == "__main__":
    main()
