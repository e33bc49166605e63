"""Drift over time: `GET /drift/{name}/{version}?until=` ends the range at a past time, so consecutive ranges chart
drift per cohort; the windows counted are exactly those that ended in `[until - window_s, until]`, whether they are
read raw or from the drift rollups (the bucket holding `until` read raw), on both databases."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from sqlmodel import Session

from cloud.drift.rollups import compact_drift
from cloud.telemetry.windows import ingest_telemetry
from compression.data import load_dataset
from protocol.messages import ModelRef, TelemetryWindow, utcnow
from simulators.drift import parse_drift
from tests.cloud.conftest import Api
from tests.cloud.drift_helpers import DigitsDevice, digits_profile

BUCKET_S = 300


def _window(api: Api, device: DigitsDevice, model: ModelRef, end: datetime, *, noise: bool = False) -> None:
    """One window of 150 held-out digits that ended at `end` (noisy ones when `noise`)."""
    data, rng = load_dataset("digits"), np.random.default_rng(int(end.timestamp()))
    picked = rng.choice(len(data.x), 150)
    x = data.x[picked].astype(np.float32)
    if noise:
        x = parse_drift("noise=0.6").apply(x, rng).astype(np.float32)
    window = device.window(x, data.y[picked], model=model)
    dated = window.model_copy(update={"window_start": end - timedelta(seconds=10), "window_end": end})
    with Session(api.coordinator.engine) as session:
        assert ingest_telemetry(session=session, window=TelemetryWindow.model_validate(dated.model_dump()))


@pytest.fixture
def history(api: Api, digits_model_path: Path) -> tuple[Api, datetime]:
    """Two devices' windows over three 5-minute buckets two hours ago; site b turns noisy in the third bucket.

    Returns the api and the start of the first bucket (`base`): windows ended at base+60 (a), base+400 (a),
    base+650 (b, noisy), base+700 (a) and base+890 (b, noisy).
    """
    profile = digits_profile(digits_model_path)
    pushed = api.push("digits", "1.0", digits_model_path.read_bytes(), profile=profile.model_dump_json())
    session = ort.InferenceSession(str(digits_model_path), providers=["CPUExecutionProvider"])
    model = ModelRef(name="digits", version="1.0", sha256=str(pushed["sha256"]))
    devices = {}
    for device_id, site in {"a-1": "a", "b-1": "b"}.items():
        api.enrol(device_id, tags={"site": site})
        devices[site] = DigitsDevice(device_id, session, profile.semantics)
    start = utcnow() - timedelta(hours=2)
    base = datetime.fromtimestamp(int(start.timestamp()) // BUCKET_S * BUCKET_S, UTC)
    for site, offset, noise in (("a", 60, False), ("a", 400, False), ("b", 650, True), ("a", 700, False),
                                ("b", 890, True)):  # fmt: skip
        _window(api, devices[site], model, base + timedelta(seconds=offset), noise=noise)
    return api, base


def _windows(api: Api, until: datetime, window_s: int = 600) -> dict[str, int]:
    response = api.client.get(
        "/api/v1/drift/digits/1.0", params={"by": "site", "window_s": window_s, "until": until.isoformat()}
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["until"] is not None and datetime.fromisoformat(body["until"]) == until
    assert body["thresholds"]["min_effect"] == 0.1 and body["thresholds"]["accuracy_drop"] == 0.05  # what it judged by
    return {c["cohort"]: c["windows"] for c in body["cohorts"]}


def test_drift_until_counts_only_the_windows_that_ended_in_the_past_range(history: tuple[Api, datetime]) -> None:
    api, base = history
    until = base + timedelta(seconds=660)  # mid third bucket: (60, 400, 650) in, 700 and 890 out
    assert _windows(api, until) == {"site=a": 2, "site=b": 1}
    assert _windows(api, base + timedelta(seconds=900)) == {"site=a": 2, "site=b": 2}  # 60 falls out, 700/890 in
    assert _windows(api, base - timedelta(seconds=60)) == {}, "a range before any window: no cohort"


def test_drift_until_reads_the_same_windows_from_rollups_as_raw(history: tuple[Api, datetime]) -> None:
    api, base = history
    ends = [base + timedelta(seconds=s) for s in (300, 450, 660, 899, 900, 1200)]
    raw = [_windows(api, until) for until in ends]
    assert compact_drift(api.coordinator.engine, bucket_s=BUCKET_S).windows == 5
    assert [_windows(api, until) for until in ends] == raw


def test_consecutive_ranges_show_the_cohort_turning_drifted(history: tuple[Api, datetime]) -> None:
    api, base = history
    compact_drift(api.coordinator.engine, bucket_s=BUCKET_S)
    verdicts = []
    for until in (base + timedelta(seconds=600), base + timedelta(seconds=900)):
        body = api.client.get(
            "/api/v1/drift/digits/1.0", params={"by": "site", "window_s": 300, "until": until.isoformat()}
        ).json()
        verdicts.append({c["cohort"]: "drifted" if c["drifted"] else "stable" for c in body["cohorts"]})
    # (300, 600]: a's window at 400 alone (150 rows, fewer than drift needs); (600, 900]: b's two noisy ones.
    assert verdicts == [{"site=a": "stable"}, {"site=a": "stable", "site=b": "drifted"}]


def test_drift_until_without_a_time_zone_is_refused(history: tuple[Api, datetime]) -> None:
    api, base = history
    naive = (base + timedelta(seconds=600)).replace(tzinfo=None).isoformat()
    response = api.client.get("/api/v1/drift/digits/1.0", params={"until": naive})
    assert response.status_code == 422 and "timezone" in response.text
