"""Drift query and fleet summary time at 1 M stored windows vs 10 k: does their cost follow the table or the range?

Two fresh databases of the same fleet (D devices with a `site` tag, S sites; the reference digits MLP pushed with a
real reference profile over the held-out digits), each device sending a window every 30 s:

- SMALL: R windows in all (default 10,000), every one of them in the last hour;
- LARGE: the same R windows in the last hour plus `--large` - R older ones (default 990,000: days old).

Windows carry real `WindowSketches`: the model run over 100 random held-out digits, from a pool of 64 sketches
built once and reused across rows (its JSON serialized once per pool entry). Older windows carry a small sketch
(5 rows, from a pool of their own) by default: full ones (~5.9 KB each) would make the LARGE file ~6 GB; the drift
query never reads them when it uses its index (`--old-sketches full|small|none`). Rollups (`telemetry_rollup`,
60 s buckets) are summed from the same windows with `cloud.telemetry.rollups`' merge functions. Rows go in
through the DBAPI (SQLite: `executemany`; PostgreSQL: `COPY`) in transactions of 100,000, oldest first, devices
interleaved (the order ingest writes them).

Then, in the same process, interleaved SMALL/LARGE, median of `--runs` after one warm-up call each:
`cloud.drift.service.fleet_drift(by="site", window_s=3600)` read raw (the drift rollups' mark hidden: every window in
range decoded) and from drift rollups (whole 300 s buckets from `drift_rollup`, raw windows for the partial bucket at
the range's start; compacted by `cloud.drift.rollups.compact_drift` after the build, the older windows counted as
compacted already: the query never reads their buckets), `cloud.telemetry.summary.fleet_summary` (what
`GET /fleet/summary` returns) and `cloud.telemetry.rollups.rollup_series` over the last hour. Prints seconds and
the LARGE/SMALL ratio (near 1: the cost follows the windows in range, not the table), build times, database
sizes, and the query plans (`EXPLAIN QUERY PLAN` / `EXPLAIN`) of the statements each function ran on LARGE.

    python benchmarks/bench_drift.py [--large 1000000] [--recent 10000] [--devices 100] [--sites 5] [--runs 5]
                                     [--old-sketches small] [--database-url postgresql://postgres@127.0.0.1/test]

With `--database-url` (a PostgreSQL server's URL whose user may create databases) both databases are fresh
databases on that server, dropped afterwards; without it, SQLite files in a temporary directory.
"""

from __future__ import annotations

import argparse
import io
import itertools
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import delete, event, func, null, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, select

from cloud.artifacts import FileArtifactStore
from cloud.db import create_db_engine, init_db
from cloud.drift.rollups import compact_drift
from cloud.drift.service import fleet_drift
from cloud.models import Device, EnrolmentState, TelemetryRecord
from cloud.models.telemetry import DriftRollup, DriftRollupMark, TelemetryRollup
from cloud.services.registry import push_model_version
from cloud.telemetry.rollups import DEFAULT_BUCKET_S, bucket_of, merge_counts, merge_histogram, rollup_series
from cloud.telemetry.summary import fleet_summary
from compression.data import load_dataset
from compression.profile import build_profile
from compression.reference import train_digits_mlp
from protocol.outputs import predictions
from protocol.profiles import ReferenceProfile
from protocol.sketches import SketchSet
from protocol.telemetry import latency_histogram

MODEL, VERSION = "digits", "1.0"
INTERVAL_S = 30  # seconds between a device's windows
NEWEST_AGE_S = 90  # the newest window ends this long before `now`
OLD_AGE_S = 86_400  # the newest of the older windows ends a day before `now` (the rest are days older)
DRIFT_WINDOW_S = 3600
DRIFT_BUCKET_S = 300  # drift rollups' buckets (the setting's default)
RECENT_ROWS, OLD_ROWS, POOL = 100, 5, 64  # rows sketched per window (recent, old small), sketches per pool
CHUNK = 100_000  # windows per transaction while building


@dataclass(frozen=True)
class Sample:
    """What one pooled window carries: its sketches and counts, JSON already serialized for the database."""

    inferences: int
    histogram: list[int]
    classes: dict[str, int]
    histogram_json: Any
    classes_json: Any
    sketches_json: Any


Entry = tuple[int, list[int], dict[str, int], dict[str, Any] | None]  # rows, histogram, classes, sketches


@dataclass
class Reference:
    """The pushed model's bytes and profile, and the window pools drawn from its real predictions."""

    onnx: bytes
    profile: ReferenceProfile
    recent: list[Entry]
    old: list[Entry]
    old_sketches: str  # small | full | none


@dataclass
class Built:
    """One benchmark database: its engine, size and build time."""

    name: str
    engine: Engine
    windows: int
    rollups: int
    build_s: float
    size_bytes: int = 0
    compaction_s: float = 0.0
    drift_rollups: int = 0
    timings: dict[str, list[float]] = field(default_factory=dict)


def compact(built: Built, recent: int) -> None:
    """Drift rollups of the newest `recent` windows (the older ones counted as compacted: outside every range)."""
    with Session(built.engine) as session:
        newest = int(session.exec(select(func.max(TelemetryRecord.id))).one() or 0)
        session.add(DriftRollupMark(window_id=max(0, newest - recent), bucket_s=DRIFT_BUCKET_S))
        session.commit()
    started = time.perf_counter()
    done = compact_drift(built.engine, bucket_s=DRIFT_BUCKET_S)
    built.compaction_s = time.perf_counter() - started
    with Session(built.engine) as session:
        built.drift_rollups = int(session.exec(select(func.count()).select_from(DriftRollup)).one())
    if done.windows != recent:
        raise RuntimeError(f"compaction merged {done.windows} windows, not the {recent} recent ones")


def reference(directory: Path, old_sketches: str) -> Reference:
    """Train the digits MLP, build its profile over the held-out digits, and sketch the window pools."""
    model_bytes = train_digits_mlp().onnx_bytes
    path = directory / "digits.onnx"
    path.write_bytes(model_bytes)
    data = load_dataset("digits")
    profile = build_profile(path, data, source="digits (held-out)")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name, outputs = session.get_inputs()[0].name, [o.name for o in session.get_outputs()]
    rng = np.random.default_rng(0)

    def sample(rows: int) -> Entry:
        x = np.ascontiguousarray(data.x[rng.choice(len(data.x), rows)], dtype=np.float32)
        read = predictions(profile.semantics, dict(zip(outputs, session.run(None, {name: x}), strict=True)))
        sketches = SketchSet(name)
        sketches.update(x, read)
        wire = sketches.to_wire()
        assert read.classes is not None
        classes: dict[str, int] = {}
        for cls in read.classes:
            classes[str(int(cls))] = classes.get(str(int(cls)), 0) + 1
        histogram = latency_histogram(rng.gamma(2.0, 1.5, rows).tolist())
        return rows, histogram, classes, wire.model_dump(mode="json") if wire is not None else None

    recent = [sample(RECENT_ROWS) for _ in range(POOL)]
    old = [sample(RECENT_ROWS if old_sketches == "full" else OLD_ROWS) for _ in range(POOL)]
    return Reference(onnx=model_bytes, profile=profile, recent=recent, old=old, old_sketches=old_sketches)


def pools(ref: Reference, engine: Engine) -> tuple[list[Sample], list[Sample]]:
    """The pools with their JSON columns serialized the way `engine`'s dialect stores them."""
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]

    def encoded(column: str, value: Any) -> Any:
        process = table.c[column].type.bind_processor(engine.dialect)
        return process(value) if process is not None else json.dumps(value)

    def made(entry: Entry, keep_sketch: bool) -> Sample:
        rows, histogram, classes, sketches = entry
        return Sample(
            inferences=rows, histogram=histogram, classes=classes,
            histogram_json=encoded("latency_histogram", histogram), classes_json=encoded("class_counts", classes),
            sketches_json=encoded("sketches", sketches) if keep_sketch and sketches is not None else None,
        )  # fmt: skip

    return [made(e, True) for e in ref.recent], [made(e, ref.old_sketches != "none") for e in ref.old]


class Writer:
    """Bulk rows into one table through the DBAPI: `executemany` on SQLite, `COPY` on PostgreSQL."""

    def __init__(self, engine: Engine, table: str, columns: list[str]) -> None:
        self.engine, self.table, self.columns = engine, table, columns
        self.postgres = engine.dialect.name == "postgresql"

    def write(self, connection: Any, rows: list[tuple[Any, ...]]) -> int:
        """Write `rows` in the caller's transaction; how many."""
        if not rows:
            return 0
        names = ", ".join(self.columns)
        if self.postgres:
            cursor = connection.driver_connection.cursor()
            with cursor, cursor.copy(f"COPY {self.table} ({names}) FROM STDIN") as copy:
                for row in rows:
                    copy.write_row(row)
            return len(rows)
        marks = ", ".join("?" for _ in self.columns)
        connection.cursor().executemany(f"INSERT INTO {self.table} ({names}) VALUES ({marks})", rows)
        return len(rows)


@dataclass
class _Open:
    bucket: datetime
    windows: int
    inferences: int
    errors: int
    histogram: list[int]
    classes: dict[str, int]


class RollupSums:
    """Rollup rows summed from windows as they are generated: each device's windows come in time order, so a
    device's bucket is finished when its next window falls in a later one."""

    def __init__(self, stamp: Callable[[datetime], Any]) -> None:
        self.stamp = stamp
        self.open: dict[str, _Open] = {}
        self.finished: list[tuple[Any, ...]] = []

    def add(self, device_id: str, bucket: datetime, sample: Sample, error: int) -> None:
        """Add one window of `device_id` starting in `bucket`."""
        current = self.open.get(device_id)
        if current is not None and current.bucket != bucket:
            self._close(device_id)
            current = None
        if current is None:
            self.open[device_id] = _Open(bucket, 1, sample.inferences, error, sample.histogram, sample.classes)
            return
        current.windows, current.inferences, current.errors = (
            current.windows + 1, current.inferences + sample.inferences, current.errors + error
        )  # fmt: skip
        current.histogram = merge_histogram(current.histogram, sample.histogram)
        current.classes = merge_counts(current.classes, sample.classes)

    def take(self, *, everything: bool = False) -> list[tuple[Any, ...]]:
        """The finished rows (with `everything`, the open ones too), handed over once."""
        if everything:
            for device_id in list(self.open):
                self._close(device_id)
        taken, self.finished = self.finished, []
        return taken

    def _close(self, device_id: str) -> None:
        r = self.open.pop(device_id)
        self.finished.append(
            (device_id, MODEL, VERSION, self.stamp(r.bucket), r.windows, r.inferences, r.errors,
             json.dumps(r.histogram), json.dumps(r.classes))
        )  # fmt: skip


WINDOW_COLUMNS = [
    "device_id", "seq", "prev_seq", "window_start", "window_end", "model_name", "model_version", "model_sha256",
    "inference_count", "error_count", "latency_histogram", "class_counts", "sketches", "received_at",
]  # fmt: skip
ROLLUP_COLUMNS = [
    "device_id", "model_name", "model_version", "bucket_start", "windows", "inference_count", "error_count",
    "latency_histogram", "class_counts",
]  # fmt: skip


def build(
    name: str, engine: Engine, ref: Reference, *, ids: list[str], sites: int, recent: int,
    total: int, now: datetime, directory: Path,
) -> Built:  # fmt: skip
    """Schema, the pushed version, the devices, then `total` windows (the newest `recent` in the last hour)."""
    started = time.perf_counter()
    init_db(engine)
    store = FileArtifactStore(directory / f"artifacts-{name}")
    with Session(engine) as session:
        pushed = push_model_version(
            session=session, store=store, name=MODEL, version=VERSION, stream=io.BytesIO(ref.onnx), profile=ref.profile
        )
        for i, device_id in enumerate(ids):
            session.add(
                Device(
                    id=device_id, enrolment=EnrolmentState.ENROLLED.value, enrolled_at=now, status="online",
                    tags={"site": f"site-{i % sites}"}, active_model_name=MODEL, active_model_version=VERSION,
                    active_model_sha256=pushed.sha256, last_seen=now,
                )
            )  # fmt: skip
        session.flush()
        session.connection().execute(update(Device).values(desired_state=null()))  # nothing to republish
        session.commit()
        sha256 = pushed.sha256
    recent_pool, old_pool = pools(ref, engine)
    table = TelemetryRecord.__table__  # type: ignore[attr-defined]
    stamp = table.c.window_end.type.bind_processor(engine.dialect) or (lambda v: v)
    bucket_stamp = TelemetryRollup.__table__.c.bucket_start.type.bind_processor(engine.dialect) or (lambda v: v)  # type: ignore[attr-defined]
    per_device, recent_per_device = total // len(ids), recent // len(ids)
    windows_writer = Writer(engine, "telemetry_window", WINDOW_COLUMNS)
    rollups_writer = Writer(engine, "telemetry_rollup", ROLLUP_COLUMNS)
    sums = RollupSums(bucket_stamp)

    def rows() -> Iterator[tuple[Any, ...]]:
        for step in range(per_device):
            recent_step = step - (per_device - recent_per_device)  # < 0: an older window
            pool, newest = (recent_pool, NEWEST_AGE_S) if recent_step >= 0 else (old_pool, OLD_AGE_S)
            steps_back = recent_per_device - 1 - recent_step if recent_step >= 0 else -1 - recent_step
            for i, device_id in enumerate(ids):
                age_s = newest + steps_back * INTERVAL_S + (i * 7) % INTERVAL_S
                end, sample, error = (
                    now - timedelta(seconds=age_s),
                    pool[(step * 31 + i) % POOL],
                    int((step + i) % 7 == 0),
                )
                start = end - timedelta(seconds=INTERVAL_S)
                sums.add(device_id, bucket_of(start, DEFAULT_BUCKET_S), sample, error)
                yield (
                    device_id, step + 1, step or None, stamp(start), stamp(end), MODEL, VERSION, sha256,
                    sample.inferences, error, sample.histogram_json, sample.classes_json, sample.sketches_json,
                    stamp(end + timedelta(milliseconds=150)),
                )  # fmt: skip

    generated, rollups = rows(), 0
    with engine.connect() as connection:
        raw_connection = connection.connection
        while chunk := list(itertools.islice(generated, CHUNK)):
            windows_writer.write(raw_connection, chunk)
            rollups += rollups_writer.write(raw_connection, sums.take())
            raw_connection.commit()
        rollups += rollups_writer.write(raw_connection, sums.take(everything=True))
        raw_connection.commit()
    built = Built(name, engine, per_device * len(ids), rollups, time.perf_counter() - started)
    built.size_bytes = database_size(engine)
    return built


def database_size(engine: Engine) -> int:
    """Bytes the database takes (SQLite: the file after a WAL checkpoint; PostgreSQL: `pg_database_size`)."""
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            return int(connection.exec_driver_sql("SELECT pg_database_size(current_database())").scalar_one())
        connection.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
        path = engine.url.database
    assert path is not None
    return Path(path).stat().st_size + sum(p.stat().st_size for p in Path(path).parent.glob(Path(path).name + "-*"))


def queries(now: datetime) -> dict[str, Callable[[Session], Any]]:
    """The measured calls: name → call returning what is checked equal (drift) or reported."""

    def drift(session: Session) -> Any:
        report = fleet_drift(session=session, model=MODEL, version=VERSION, by="site", window_s=DRIFT_WINDOW_S, now=now)
        return [(c.key, c.windows, len(c.devices), c.unreadable, d.drifted) for c, d in report.cohorts]

    def drift_raw(session: Session) -> Any:
        session.connection().execute(delete(DriftRollupMark))  # as if nothing were compacted; rolled back
        try:
            return drift(session)
        finally:
            session.rollback()

    def summary(session: Session) -> Any:
        result = fleet_summary(session=session)
        return (result.device_count, result.inference_count)

    def series(session: Session) -> Any:
        rows = rollup_series(
            session, device_ids=None, model=MODEL, since=now - timedelta(seconds=DRIFT_WINDOW_S), until=now
        )
        return sum(r.windows for r in rows)

    return {
        "fleet_drift raw windows": drift_raw,
        "fleet_drift drift rollups": drift,
        "fleet_summary": summary,
        "rollup_series(last hour)": series,
    }


def timed(engine: Engine, call: Callable[[Session], Any]) -> tuple[float, Any]:
    """Seconds of one call on a fresh session (as one API request has), and what it returned."""
    with Session(engine) as session:
        started = time.perf_counter()
        result = call(session)
        return time.perf_counter() - started, result


@contextmanager
def statements(engine: Engine) -> Iterator[list[tuple[str, Any]]]:
    """The SQL statements (and parameters) run on `engine` inside the block."""
    seen: list[tuple[str, Any]] = []

    def record(_conn: Any, _cursor: Any, statement: str, parameters: Any, _context: Any, _many: bool) -> None:
        seen.append((statement, parameters))

    event.listen(engine, "before_cursor_execute", record)
    try:
        yield seen
    finally:
        event.remove(engine, "before_cursor_execute", record)


def plans(engine: Engine, call: Callable[[Session], Any]) -> list[tuple[str, list[str]]]:
    """The query plan of each statement `call` runs on the telemetry tables."""
    with statements(engine) as seen:
        timed(engine, call)
    prefix = "EXPLAIN " if engine.dialect.name == "postgresql" else "EXPLAIN QUERY PLAN "
    out = []
    with engine.connect() as connection:
        for statement, parameters in seen:
            if not any(t in statement for t in ("telemetry_window", "telemetry_rollup", "drift_rollup")):
                continue
            rows = connection.exec_driver_sql(prefix + statement, parameters).all()
            lines = [str(r[0]) if len(r) == 1 else str(r[-1]) for r in rows]
            out.append((" ".join(statement.split())[:160], lines))
    return out


@contextmanager
def databases(database_url: str | None, directory: Path) -> Iterator[tuple[str, str]]:
    """Two fresh database URLs (SMALL, LARGE): SQLite files in `directory`, or databases on a PostgreSQL server."""
    if database_url is None:
        yield f"sqlite:///{directory / 'small.db'}", f"sqlite:///{directory / 'large.db'}"
        return
    import psycopg

    admin = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    names = [f"bench_drift_{kind}_{uuid.uuid4().hex[:8]}" for kind in ("small", "large")]
    with psycopg.connect(admin, autocommit=True, connect_timeout=5) as conn:
        for name in names:
            conn.execute(f'CREATE DATABASE "{name}"')
    base = admin.rsplit("/", 1)[0]
    try:
        yield f"{base}/{names[0]}", f"{base}/{names[1]}"
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            for name in names:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def measure(small: Built, large: Built, now: datetime, runs: int) -> None:
    """Each call on SMALL and LARGE, interleaved: one warm-up each, then `runs` timed; results checked equal."""
    drifts = []
    for name, call in queries(now).items():
        results = {}
        for built in (small, large):
            _, results[built.name] = timed(built.engine, call)  # warm-up
        if name.startswith("fleet_drift") and results["SMALL"] != results["LARGE"]:
            raise RuntimeError(f"drift differs between SMALL and LARGE: {results}")
        if name.startswith("fleet_drift"):
            drifts.append(results["LARGE"])
        if len(drifts) == 2 and drifts[0] != drifts[1]:
            raise RuntimeError(f"drift from rollups differs from drift from raw windows: {drifts}")
        print(f"  {name}: SMALL returned {results['SMALL']!s:.120}; LARGE {results['LARGE']!s:.120}")
        for _ in range(runs):
            for built in (small, large):
                seconds, _ = timed(built.engine, call)
                built.timings.setdefault(name, []).append(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--large", type=int, default=1_000_000, help="windows stored in LARGE in all")
    parser.add_argument("--recent", type=int, default=10_000, help="windows in the last hour (SMALL: all of them)")
    parser.add_argument("--devices", type=int, default=100)
    parser.add_argument("--sites", type=int, default=5)
    parser.add_argument("--runs", type=int, default=5, help="timed calls per function and database (median)")
    old_help = f"sketches of LARGE's older windows: {OLD_ROWS} rows (small), {RECENT_ROWS} rows (full) or none"
    parser.add_argument("--old-sketches", choices=["small", "full", "none"], default="small", help=old_help)
    parser.add_argument("--database-url", help="a PostgreSQL server URL (fresh databases made and dropped there)")
    args = parser.parse_args()
    if args.recent // args.devices * INTERVAL_S + NEWEST_AGE_S + INTERVAL_S > DRIFT_WINDOW_S:
        parser.error(f"{args.recent} windows of {args.devices} devices every {INTERVAL_S} s exceed the last hour")
    if args.large < args.recent:
        parser.error("--large must be at least --recent")
    ids = [f"dev-{i:04d}" for i in range(args.devices)]
    now = datetime.now(UTC).replace(microsecond=0)
    with tempfile.TemporaryDirectory(prefix="bench-drift-") as tmp:
        directory = Path(tmp)
        started = time.perf_counter()
        ref = reference(directory, args.old_sketches)
        print(f"model, profile and sketch pools: {time.perf_counter() - started:.1f} s")
        with databases(args.database_url, directory) as (small_url, large_url):
            engines = [create_db_engine(small_url), create_db_engine(large_url)]
            try:
                built = [
                    build(name, engine, ref, ids=ids, sites=args.sites, recent=args.recent, total=total,
                          now=now, directory=directory)
                    for name, engine, total in zip(("SMALL", "LARGE"), engines, (args.recent, args.large), strict=True)
                ]  # fmt: skip
                for one in built:
                    compact(one, args.recent)
                report(built, args, now)
            finally:
                for engine in engines:
                    engine.dispose()


def report(built: list[Built], args: argparse.Namespace, now: datetime) -> None:
    """Measure, then print sizes, times, ratios and LARGE's query plans."""
    small, large = built
    dialect = small.engine.dialect.name
    print(f"database: {dialect}; {args.devices} devices in {args.sites} sites, one window per {INTERVAL_S} s each")
    print(f"recent windows: {RECENT_ROWS} digits rows sketched each (pool of {POOL} reused across rows)")
    old_rows = {"small": f"{OLD_ROWS} rows each", "full": f"{RECENT_ROWS} rows each", "none": "none"}
    print(f"older windows' sketches: {old_rows[args.old_sketches]} (pool of {POOL} reused across rows)")
    for one in built:
        print(
            f"{one.name}: {one.windows:,} windows ({args.recent:,} in the last hour), {one.rollups:,} rollups; "
            f"built in {one.build_s:.1f} s; {one.size_bytes / 2**20:,.1f} MiB; {one.drift_rollups:,} drift rollups "
            f"compacted in {one.compaction_s:.1f} s"
        )
    measure(small, large, now, args.runs)
    print(f"\nmedian of {args.runs} (seconds)          SMALL      LARGE   LARGE/SMALL")
    for name in small.timings:
        a, b = statistics.median(small.timings[name]), statistics.median(large.timings[name])
        print(f"{name:<28} {a:10.3f} {b:10.3f} {b / a:10.2f}x")
    for one in built:
        raw = statistics.median(one.timings["fleet_drift raw windows"])
        rolled = statistics.median(one.timings["fleet_drift drift rollups"])
        print(
            f"{one.name}: fleet_drift from drift rollups {rolled:.3f} s vs raw windows {raw:.3f} s: {raw / rolled:.1f}x"
        )
    print("\nquery plans on LARGE:")
    for name, call in queries(now).items():
        for statement, lines in plans(large.engine, call):
            print(f"  {name}: {statement}")
            for line in lines:
                print(f"      {line}")


if __name__ == "__main__":
    main()
