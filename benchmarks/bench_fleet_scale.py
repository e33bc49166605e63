"""Fleet scale: N connected light devices each reporting telemetry every 10 s, held by one coordinator + Mosquitto.

One coordinator process (`edgefleet up`, SQLite by default, `--database postgresql`: a fresh database on the
local server) and the fleet's Mosquitto (mTLS, ACL). For each N of `--devices` (1,000 then 10,000 by default)
light simulated devices (`simulators.light`, `--processes` worker processes, one per 2,500 by default) enrol
with a bootstrap secret (once: the 10,000 phase reuses the 1,000 phase's identities), connect, and publish a
`TelemetryWindow` every `--interval` s from a random phase (seq increasing with `prev_seq`, 100 calls, a
latency histogram, class counts and the sketches of 12 calls: the default agent sketches 1 call in 8). Once
every device has connected and the backlog the enrolment left has drained (the newest stored window under 2 s
old: `backlog_drain_s`; at most `--settle-timeout`), `--duration` s are measured:

- ingest lag: the row's `received_at` (the coordinator's store time) minus the window's `window_end` (its
  publish time, same clock), p50/p95/p99/max over every window published in the measured span;
- windows published vs stored (lost = published - stored, counted after the devices stop and the ingest drains);
- the coordinator's CPU seconds per second (its process and children) and RSS (peak sampled each second), and
  Mosquitto's; the 10k/1k ratios;
- baseline, same run: the broker's own round trip, each window's PUBACK as its device saw it (p50/p99), and the
  devices' publish rate (windows/s) against the stored rate.

Run: `.venv/bin/python benchmarks/bench_fleet_scale.py [--devices 1000,10000] [--duration 60] [--database
postgresql]` (about 2 min for 1,000; 10,000 adds the enrolment of 9,000, several minutes).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext, suppress
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from sqlalchemy import func
from sqlmodel import Session, col, select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ingest import postgres_database
from cloud.db import create_db_engine
from cloud.models import TelemetryRecord
from simulators import CoordinatorProcess
from simulators.brokers import MosquittoProcess
from simulators.light import LightFleet

TOPIC_BASE = "bench/scale/v1"
PER_PROCESS = 2500
SETTLED_S = 2.0  # the newest stored window at most this old: no backlog left


class TreeSampler:
    """CPU seconds and peak RSS of a process and its children, RSS sampled every second on a thread."""

    def __init__(self, pid: int) -> None:
        self.process = psutil.Process(pid)
        self.peak_rss = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        return [self.process, *self.process.children(recursive=True)]

    def cpu_s(self) -> float:
        """User + system CPU seconds of the process and its living children so far."""
        total = 0.0
        for proc in self._tree():
            with suppress(psutil.NoSuchProcess):
                times = proc.cpu_times()
                total += times.user + times.system
        return total

    def rss(self) -> int:
        """Resident bytes of the process and its living children now."""
        total = 0
        for proc in self._tree():
            with suppress(psutil.NoSuchProcess):
                total += proc.memory_info().rss
        return total

    def _sample(self) -> None:
        while not self._stop.wait(1.0):
            self.peak_rss = max(self.peak_rss, self.rss())

    def __enter__(self) -> TreeSampler:
        self.peak_rss = self.rss()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def percentiles(values: list[float]) -> dict[str, float]:
    """p50/p95/p99/max of `values` (ms), rounded."""
    if not values:
        return {}
    ordered = sorted(values)

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, int(q * len(ordered)))], 1)

    return {"p50": at(0.50), "p95": at(0.95), "p99": at(0.99), "max": round(ordered[-1], 1)}


def _utc(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def stored_since(database_url: str, since: datetime) -> int:
    """Windows stored whose `window_end` is at or after `since`."""
    engine = create_db_engine(database_url)
    try:
        with Session(engine) as session:
            query = select(func.count(col(TelemetryRecord.id))).where(col(TelemetryRecord.window_end) >= since)
            return int(session.exec(query).one())
    finally:
        engine.dispose()


def newest_lag_s(database_url: str) -> float | None:
    """Seconds from the newest stored window's publish to now: a backlog's age (None before any window)."""
    engine = create_db_engine(database_url)
    try:
        with Session(engine) as session:
            query = select(TelemetryRecord.window_end).order_by(col(TelemetryRecord.id).desc()).limit(1)
            newest = session.exec(query).first()
    finally:
        engine.dispose()
    return None if newest is None else (datetime.now(UTC) - _utc(newest)).total_seconds()


def settle(database_url: str, timeout: float) -> float:
    """Wait until the coordinator stores windows published a moment ago (the backlog the enrolment left, drained);
    the seconds it took (timeout: measured anyway, the lag then shows the backlog)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        lag = newest_lag_s(database_url)
        if lag is not None and lag < SETTLED_S:
            break
        time.sleep(2.0)
    return time.monotonic() - started


def lags_ms(database_url: str, start: datetime, end: datetime) -> list[float]:
    """`received_at - window_end` (ms) of every window published in [start, end)."""
    engine = create_db_engine(database_url)
    try:
        with Session(engine) as session:
            query = select(TelemetryRecord.window_end, TelemetryRecord.received_at).where(
                col(TelemetryRecord.window_end) >= start, col(TelemetryRecord.window_end) < end
            )
            return [
                (_utc(received) - _utc(published)).total_seconds() * 1000
                for published, received in session.exec(query).all()
            ]
    finally:
        engine.dispose()


def run_phase(
    args: argparse.Namespace,
    root: Path,
    coordinator: CoordinatorProcess,
    broker: MosquittoProcess,
    secret: str,
    database_url: str,
    n: int,
) -> dict[str, Any]:
    """N devices: connect them, measure `--duration` s of telemetry, stop them, count what was stored."""
    phase_start = datetime.now(UTC)
    processes = args.processes or -(-n // PER_PROCESS)
    fleet = LightFleet(
        coordinator_url=coordinator.url,
        bootstrap_secret=secret,
        devices=n,
        data_root=root / "light",
        processes=processes,
        telemetry_s=args.interval,
    )
    started = time.perf_counter()
    fleet.start()
    connect_s = time.perf_counter() - started
    try:
        settle_s = settle(database_url, args.settle_timeout)
        assert coordinator.proc is not None and broker.proc is not None
        with TreeSampler(coordinator.proc.pid) as coord, TreeSampler(broker.proc.pid) as mosq:
            cpu0, mcpu0, t0 = coord.cpu_s(), mosq.cpu_s(), time.perf_counter()
            measure_start = datetime.now(UTC)
            time.sleep(args.duration)
            measure_end = datetime.now(UTC)
            elapsed = time.perf_counter() - t0
            cpu, mcpu = coord.cpu_s() - cpu0, mosq.cpu_s() - mcpu0
            rss_end = coord.rss()
    finally:
        result = fleet.stop()
    sent = result.windows_sent
    deadline = time.monotonic() + 120
    stored = stored_since(database_url, phase_start)
    while stored < sent and time.monotonic() < deadline:
        time.sleep(1.0)
        stored = stored_since(database_url, phase_start)
    lags = lags_ms(database_url, measure_start, measure_end)
    start_s, end_s = measure_start.timestamp(), measure_end.timestamp()
    pubacks = [ms for figures in result.devices.values() for at, ms in figures["pubacks"] if start_s <= at < end_s]
    lag = percentiles(lags)
    puback = percentiles(pubacks)
    return {
        "devices": n,
        "device_processes": processes,
        "enrol_and_connect_s": round(connect_s, 1),
        "backlog_drain_s": round(settle_s, 1),
        "measured_s": round(elapsed, 1),
        "windows_published": sent,
        "windows_stored": stored,
        "windows_lost": sent - stored,
        "windows_in_measured_span": len(lags),
        "stored_windows_per_s": round(len(lags) / elapsed, 1),
        "ingest_lag_ms": lag,
        "baseline_broker_puback_ms": puback,
        "lag_p50_over_puback_p50": round(lag["p50"] / puback["p50"], 1) if lag and puback.get("p50") else None,
        "lag_p99_over_puback_p99": round(lag["p99"] / puback["p99"], 1) if lag and puback.get("p99") else None,
        "coordinator_cpu_s_per_s": round(cpu / elapsed, 3),
        "coordinator_rss_mb_end": round(rss_end / 2**20, 1),
        "coordinator_rss_mb_peak": round(coord.peak_rss / 2**20, 1),
        "mosquitto_cpu_s_per_s": round(mcpu / elapsed, 3),
        "mosquitto_rss_mb_peak": round(mosq.peak_rss / 2**20, 1),
        "mean_lag_ms": round(statistics.fmean(lags), 1) if lags else None,
    }


def growth(phases: list[dict[str, Any]]) -> dict[str, Any]:
    """How the last phase's figures grow over the first's (devices, CPU, RSS, lag)."""
    first, last = phases[0], phases[-1]

    def ratio(key: str, sub: str | None = None) -> float | None:
        a = first[key][sub] if sub else first[key]
        b = last[key][sub] if sub else last[key]
        return round(b / a, 2) if a else None

    return {
        "devices": ratio("devices"),
        "coordinator_cpu_s_per_s": ratio("coordinator_cpu_s_per_s"),
        "coordinator_rss_mb_peak": ratio("coordinator_rss_mb_peak"),
        "mosquitto_cpu_s_per_s": ratio("mosquitto_cpu_s_per_s"),
        "mosquitto_rss_mb_peak": ratio("mosquitto_rss_mb_peak"),
        "ingest_lag_p50": ratio("ingest_lag_ms", "p50"),
        "ingest_lag_p99": ratio("ingest_lag_ms", "p99"),
    }


@contextmanager
def database(kind: str) -> Iterator[str | None]:
    """None for the coordinator's own SQLite; a fresh PostgreSQL database's URL for `postgresql`."""
    if kind == "sqlite":
        with nullcontext(None) as none:
            yield none
        return
    with postgres_database() as url:
        if url is None:
            raise SystemExit("PostgreSQL is unreachable")
        yield url


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", default="1000,10000", help="fleet sizes, comma-separated, run in order")
    parser.add_argument("--duration", type=float, default=60, help="seconds measured once every device connected")
    parser.add_argument("--interval", type=float, default=10, help="seconds between a device's windows")
    parser.add_argument("--processes", type=int, default=0, help=f"device processes (0: one per {PER_PROCESS})")
    parser.add_argument(
        "--settle-timeout", type=float, default=600, help="longest wait for the backlog of the connecting phase"
    )
    parser.add_argument("--database", choices=("sqlite", "postgresql"), default="sqlite")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.devices.split(","))
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    with tempfile.TemporaryDirectory() as tmp, database(args.database) as database_url:
        root = Path(tmp)
        broker = MosquittoProcess(root / "broker", root / "coordinator", TOPIC_BASE)
        broker.start()
        try:
            coordinator = CoordinatorProcess(
                root / "coordinator",
                mqtt_url=broker.url,
                database_url=database_url,
                topic_base=TOPIC_BASE,
                extra_args=broker.coordinator_args,
            )
            client = coordinator.start()
            try:
                secret = client.post_json("/bootstrap-secrets", {"name": "scale", "tags": {"fleet": "scale"}})["secret"]
                url = database_url or f"sqlite:///{root / 'coordinator' / 'edgefleet.db'}"
                phases = []
                for n in sizes:
                    phases.append(run_phase(args, root, coordinator, broker, secret, url, n))
                    print(json.dumps(phases[-1]), file=sys.stderr, flush=True)
            finally:
                coordinator.stop()
        finally:
            broker.stop()
    report = {
        "database": args.database,
        "interval_s": args.interval,
        "phases": phases,
        **({"growth_last_over_first": growth(phases)} if len(phases) > 1 else {}),
    }
    text = json.dumps(report, indent=2)
    print(text)
    if args.out is not None:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
