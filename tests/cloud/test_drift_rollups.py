"""Drift rollups: compaction merges windows into per-device buckets exactly once (late windows, a crash before the
commit, a concurrent compactor), and drift read from rollups plus raw windows equals drift read from raw windows
alone (both databases)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from sqlalchemy import delete, func
from sqlmodel import Session, select

from cloud.drift import rollups
from cloud.drift.rollups import Mark, compact_drift, compact_drift_batch
from cloud.drift.service import drift_public, fleet_drift
from cloud.models.telemetry import DriftRollup, DriftRollupMark
from cloud.telemetry.retention import prune_telemetry
from cloud.telemetry.windows import ingest_telemetry
from compression.data import load_dataset
from protocol.messages import ModelRef, TelemetryWindow, utcnow
from tests.cloud.conftest import Api
from tests.cloud.drift_helpers import DigitsDevice, profiled_fleet, send_traffic

SITES = {"a-1": "a", "a-2": "a", "b-1": "b", "c-1": "c"}
BUCKET_S = 300


@pytest.fixture
def fleet(api: Api, digits_model_path: Path) -> tuple[Api, list[DigitsDevice], ModelRef]:
    devices, model, _, _ = profiled_fleet(api, digits_model_path, SITES)
    send_traffic(api.coordinator, devices, model=model, drift={"b-1": "noise=0.5"}, windows=2, rows=100)
    return api, devices, model


def _late(api: Api, device: DigitsDevice, model: ModelRef, end: datetime, seed: int) -> None:
    """A window that ended at `end`, delivered now (store-and-forward after an outage)."""
    data, rng = load_dataset("digits"), np.random.default_rng(seed)
    picked = rng.choice(len(data.x), 60)
    window = device.window(data.x[picked].astype("float32"), data.y[picked], model=model)
    late = window.model_copy(update={"window_start": end - timedelta(seconds=10), "window_end": end})
    with Session(api.coordinator.engine) as session:
        assert ingest_telemetry(session=session, window=TelemetryWindow.model_validate(late.model_dump()))


def _drift(api: Api, now: datetime, *, raw: bool = False) -> dict[str, Any]:
    """The drift API shape by site; `raw`: as if nothing were compacted (the mark hidden, rolled back after)."""
    with Session(api.coordinator.engine) as session:
        if raw:
            session.connection().execute(delete(DriftRollupMark))
        body = drift_public(fleet_drift(session=session, model="digits", version="1.0", by="site", now=now))
        session.rollback()
    return body


def _assert_same(from_rollups: dict[str, Any], from_raw: dict[str, Any]) -> None:
    assert [c["cohort"] for c in from_rollups["cohorts"]] == [c["cohort"] for c in from_raw["cohorts"]]
    for mine, theirs in zip(from_rollups["cohorts"], from_raw["cohorts"], strict=True):
        for exact in ("devices", "windows", "inferences", "rows", "class_counts", "drifted", "unreadable_windows"):
            assert mine[exact] == theirs[exact], (mine["cohort"], exact)
        # The same sketches merged in another order: equal within the KLL sketch's error (k=200: ~1.3 % rank).
        for f_mine, f_theirs in zip(mine["features"], theirs["features"], strict=True):
            assert f_mine["ks"] == pytest.approx(f_theirs["ks"], abs=0.03)
            assert f_mine["psi"] == pytest.approx(f_theirs["psi"], abs=0.05)
        assert mine["estimated_accuracy"] == pytest.approx(theirs["estimated_accuracy"], abs=0.01)


def _windows_in_rollups(api: Api) -> int:
    with Session(api.coordinator.engine) as session:
        return int(session.exec(select(func.coalesce(func.sum(DriftRollup.windows), 0))).one())


def test_drift_from_rollups_equals_raw_windows_with_late_windows_and_a_crash_between_steps(
    fleet: tuple[Api, list[DigitsDevice], ModelRef], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, devices, model = fleet
    engine = api.coordinator.engine
    # A range whose start falls mid-bucket, so that the partial bucket at its start is read from raw windows.
    start = utcnow() - timedelta(seconds=3600)
    aligned = datetime.fromtimestamp(int(start.timestamp()) // BUCKET_S * BUCKET_S, UTC)
    now = aligned + timedelta(seconds=3600 + BUCKET_S // 2)
    since = now - timedelta(seconds=3600)
    before = _drift(api, now, raw=True)

    def crash(*_a: object, **_k: object) -> None:
        raise RuntimeError("power cut before the commit")

    with monkeypatch.context() as patched:
        patched.setattr(rollups, "_store", crash)
        with pytest.raises(RuntimeError):
            compact_drift(engine, bucket_s=BUCKET_S)
    assert _windows_in_rollups(api) == 0  # nothing of the failed step stayed: mark and rollups as they were
    done = compact_drift(engine, bucket_s=BUCKET_S)
    assert done.windows == 2 * len(devices) and _windows_in_rollups(api) == done.windows
    _assert_same(_drift(api, now), before)

    # Store-and-forward: windows that ended in buckets compacted already, in the partial bucket at the range's start
    # (one just inside the range, one just outside), delivered after the compaction.
    a1, b1 = devices[0], devices[2]
    _late(api, a1, model, now - timedelta(seconds=900), seed=1)
    _late(api, b1, model, now - timedelta(seconds=60), seed=2)
    _late(api, a1, model, since + timedelta(seconds=5), seed=3)
    _late(api, b1, model, since - timedelta(seconds=5), seed=4)
    uncompacted, raw = _drift(api, now), _drift(api, now, raw=True)
    _assert_same(uncompacted, raw)
    assert sum(c["windows"] for c in raw["cohorts"]) == 2 * len(devices) + 3
    again = compact_drift(engine, bucket_s=BUCKET_S)
    assert again.windows == 4 and _windows_in_rollups(api) == 2 * len(devices) + 4  # each window once
    assert compact_drift(engine, bucket_s=BUCKET_S).windows == 0  # nothing new: nothing merged twice
    _assert_same(_drift(api, now), raw)


def test_a_compactor_whose_mark_moved_meanwhile_writes_nothing(
    fleet: tuple[Api, list[DigitsDevice], ModelRef], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, devices, _ = fleet
    engine = api.coordinator.engine
    assert compact_drift(engine, bucket_s=BUCKET_S).windows == 2 * len(devices)
    # A second coordinator read the mark before the first one moved it: its claim fails, it merges nothing.
    monkeypatch.setattr(rollups, "_mark", lambda *_a: Mark(0, BUCKET_S))
    assert compact_drift_batch(engine, bucket_s=BUCKET_S).windows == 0
    assert _windows_in_rollups(api) == 2 * len(devices)


def test_rollup_bucket_length_stays_what_the_first_compaction_chose(
    fleet: tuple[Api, list[DigitsDevice], ModelRef],
) -> None:
    api, _, _ = fleet
    compact_drift(api.coordinator.engine, bucket_s=BUCKET_S)
    compact_drift(api.coordinator.engine, bucket_s=60)  # a changed setting: the mark keeps 300 s
    with Session(api.coordinator.engine) as session:
        assert session.exec(select(DriftRollupMark.bucket_s)).one() == BUCKET_S
        starts = session.exec(select(DriftRollup.bucket_start)).all()
    assert all(int(s.timestamp()) % BUCKET_S == 0 for s in starts)


def test_retention_deletes_old_drift_rollups_and_keeps_recent_ones(
    fleet: tuple[Api, list[DigitsDevice], ModelRef],
) -> None:
    api, _, _ = fleet
    engine = api.coordinator.engine
    compact_drift(engine, bucket_s=BUCKET_S)
    with Session(engine) as session:
        session.add(
            DriftRollup(device_id="a-1", model_name="digits", model_version="1.0",
                        bucket_start=utcnow() - timedelta(days=30), windows=1)
        )  # fmt: skip
        session.commit()
    pruned = prune_telemetry(engine, window_days=14, rollup_days=400, drift_rollup_days=7)
    assert pruned.drift_rollups == 1 and pruned.windows == 0
    with Session(engine) as session:
        kept = session.exec(select(DriftRollup.bucket_start)).all()
    assert kept and all(utcnow() - rollups._utc(s) < timedelta(days=1) for s in kept)


def test_compaction_rests_between_batches_and_stops_when_asked(
    fleet: tuple[Api, list[DigitsDevice], ModelRef],
) -> None:
    """A backlog is merged in batches with a rest after each full one (ingest shares the process and SQLite's
    writer); a rest that says stop ends the run early, and the next run goes on from the mark, nothing merged twice."""
    api, devices, _ = fleet
    engine = api.coordinator.engine
    total = 2 * len(devices)
    assert total > 4, "needs more than two batches of 2"
    rests: list[float] = []

    def rest(seconds: float) -> bool:
        rests.append(seconds)
        return len(rests) == 2  # stop after the second batch

    first = compact_drift(engine, bucket_s=BUCKET_S, batch=2, rest=rest)
    assert first.windows == 4 and len(rests) == 2 and all(r > 0 for r in rests)
    assert _windows_in_rollups(api) == 4
    assert compact_drift(engine, bucket_s=BUCKET_S, batch=2).windows == total - 4  # the rest, once each
    assert compact_drift(engine, bucket_s=BUCKET_S).windows == 0 and _windows_in_rollups(api) == total
