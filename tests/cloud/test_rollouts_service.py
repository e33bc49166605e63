"""The rollout service on SQLite and PostgreSQL, with the runner stepped by hand and a recording publisher."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import create_engine, update
from sqlmodel import Session, col

from cloud.leases import Leases
from cloud.models import Rollout
from cloud.rollouts.runner import RolloutRunner
from compression.reference import shifted_model
from tests.cloud.rollout_helpers import SHIFTED, Recorder, RolloutBench, bench

GATES = {"min_inferences": 50, "min_class_samples": 50, "max_p95_latency_ratio": 1.5}
NO_GATES = dict.fromkeys(["max_install_failure_rate", "max_error_rate_increase", "max_p95_latency_ratio", "max_psi"])


@pytest.fixture
def rb(database_url: str, tmp_path: Path, digits_model_bytes: bytes) -> Iterator[RolloutBench]:
    yield from bench(database_url, tmp_path, digits_model_bytes, shifted_model(digits_model_bytes))


def bake(
    rb: RolloutBench, ids: list[str], updated: set[str], *, classes: dict[str, int] | None = None, ms: float = 4.0
) -> None:
    """One round of telemetry: updated devices on 2.0 (with `classes`/`ms`), the others on 1.0."""
    for device_id in ids:
        if device_id in updated:
            rb.telemetry(device_id, "2.0", classes=classes or {str(c): 10 for c in range(10)}, latency_ms=ms)
        else:
            rb.telemetry(device_id, "1.0")


def updated_ids(rb: RolloutBench, rollout_id: int) -> set[str]:
    return {d["device_id"] for d in rb.rollout(rollout_id)["devices"] if d["phase"] == "succeeded"}


def drive(rb: RolloutBench, rollout_id: int, ids: list[str], steps: int, **telemetry: object) -> dict[str, object]:
    """Tick 10 s at a time, sending telemetry each time, until the rollout stops moving or `steps` run out."""
    for _ in range(steps):
        rb.tick(10)
        shown = rb.rollout(rollout_id)
        if shown["status"] in {"completed", "rolled_back", "aborted", "paused"}:
            return shown
        bake(rb, ids, updated_ids(rb, rollout_id), **telemetry)  # type: ignore[arg-type]
    return rb.rollout(rollout_id)


def test_good_version_passes_every_wave_and_each_device_is_updated_once(rb: RolloutBench) -> None:
    ids = rb.enrol(10)
    rollout = rb.create(
        waves=[
            {"count": 1, "bake_seconds": 30},
            {"percent": 50, "bake_seconds": 30},
            {"percent": 100, "bake_seconds": 30},
        ],
        gates=GATES,
    )
    shown = drive(rb, rollout["id"], ids, 60)

    assert shown["status"] == "completed", [d["message"] for d in shown["decisions"]]
    assert set(rb.versions().values()) == {"2.0"}
    per_device = Counter(d.device_id for d in rb.dispatches(rollout["id"]))
    assert per_device == dict.fromkeys(ids, 1), "every device dispatched exactly once"
    kinds = [d.kind for d in rb.decisions(rollout["id"])]
    assert kinds.count("wave_started") == 3 and kinds.count("gate_passed") == 3  # the 100 % wave on the last control
    passed = [d for d in rb.decisions(rollout["id"]) if d.kind == "gate_passed"]
    psi = next(r for r in passed[0].figures["report"]["results"] if r["name"] == "class_shift_psi")
    assert psi["verdict"] == "passed" and psi["observed"] < 0.1
    assert [w["state"] for w in shown["waves"]] == ["done", "done", "done"]
    # Dispatches went through the deployment path: deployments name the rollout.
    deployments = rb.client.get("/api/v1/deployments").json()["data"]
    assert {d["target"]["rollout_id"] for d in deployments} == {rollout["id"]}


def test_shifted_predictions_trip_psi_and_every_updated_device_is_rolled_back(rb: RolloutBench) -> None:
    ids = rb.enrol(10)
    rollout = rb.create(
        waves=[{"count": 3, "bake_seconds": 30}, {"percent": 100, "bake_seconds": 30}],
        gates=GATES,
        on_gate_failure="rollback",
    )
    shown = drive(rb, rollout["id"], ids, 30, classes=SHIFTED)
    for _ in range(5):
        rb.tick(10)
    shown = rb.rollout(rollout["id"])

    assert shown["status"] == "rolled_back", [d["message"] for d in shown["decisions"]]
    failed = next(d for d in shown["decisions"] if d["kind"] == "gate_failed")
    psi = next(r for r in failed["figures"]["report"]["results"] if r["name"] == "class_shift_psi")
    assert psi["verdict"] == "failed" and psi["observed"] > 0.25, psi
    assert "class_shift_psi" in failed["message"]
    assert set(rb.versions().values()) == {"1.0"}, "every device back on the previous version"
    rolled = {d.device_id for d in rb.dispatches(rollout["id"]) if d.kind == "rollback"}
    assert rolled == {d.device_id for d in rb.dispatches(rollout["id"]) if d.kind == "dispatch"}
    assert len(rolled) == 3, "only the first wave was ever touched"


def test_latency_regression_trips_the_p95_gate_and_pauses(rb: RolloutBench) -> None:
    ids = rb.enrol(6)
    rollout = rb.create(waves=[{"count": 2, "bake_seconds": 30}, {"percent": 100, "bake_seconds": 30}], gates=GATES)
    shown = drive(rb, rollout["id"], ids, 30, ms=40.0)
    assert shown["status"] == "paused"
    failed = next(d for d in shown["decisions"] if d["kind"] == "gate_failed")
    p95 = next(r for r in failed["figures"]["report"]["results"] if r["name"] == "p95_latency_ratio")
    assert p95["verdict"] == "failed" and p95["observed"] > 1.5
    assert shown["reason"] == "gate failed: p95_latency_ratio"


def test_failed_installs_are_retried_with_backoff_then_trip_the_install_gate(rb: RolloutBench) -> None:
    ids = rb.enrol(4)
    rb.failing = {ids[0], ids[1], ids[2], ids[3]}
    rollout = rb.create(
        waves=[{"count": 1, "bake_seconds": 30}, {"percent": 100, "bake_seconds": 30}],
        gates=GATES,
        max_retries=1,
        retry_backoff_seconds=20,
    )
    shown = drive(rb, rollout["id"], ids, 20)
    assert shown["status"] == "paused"
    kinds = [d["kind"] for d in shown["decisions"]]
    assert "retry_scheduled" in kinds and "device_failed" in kinds
    attempts = [d.attempt for d in rb.dispatches(rollout["id"])]
    assert sorted(attempts) == [1, 2], "one device, attempt 1 then its single retry"


def test_killed_after_persisting_republishes_the_same_generation_on_recovery(rb: RolloutBench) -> None:
    ids = rb.enrol(5)
    rollout = rb.create(waves=[{"percent": 100, "bake_seconds": 0}], max_concurrent_downloads=5, gates=NO_GATES)
    lost = Recorder()
    crashed = rb.new_runner(lost)  # this runner's publishes never reach any device: the process "died"
    crashed.tick(rb.now)
    generations = {s.device_id: s.generation for s in lost.published}
    assert sorted(generations) == ids

    restarted = Recorder()
    runner = rb.new_runner(restarted)
    assert runner.recover() == 5
    assert {s.device_id: s.generation for s in restarted.published} == generations, "same generation, not a new one"
    assert runner.recover() == 5  # and again: still the same
    assert {s.generation for s in restarted.published} == set(generations.values())
    for state in restarted.published:
        rb.answer(state)
    rb.tick(1)
    assert rb.rollout(rollout["id"])["status"] == "completed"
    assert Counter(d.device_id for d in rb.dispatches(rollout["id"])) == dict.fromkeys(ids, 1)
    devices = {d["id"]: d["desired_generation"] for d in rb.client.get("/api/v1/devices").json()["data"]}
    assert devices == generations


def test_late_joiner_matching_the_selector_receives_the_rollout(rb: RolloutBench) -> None:
    ids = rb.enrol(3)
    rb.enrol(1, prefix="other", tags={"site": "field"})
    rollout = rb.create(selector={"tags": {"site": "lab"}}, waves=[{"percent": 100, "bake_seconds": 0}], gates=NO_GATES)
    rb.tick(1)
    rb.tick(1)
    assert rb.rollout(rollout["id"])["status"] == "completed"
    late = rb.enrol(1, prefix="late")[0]
    rb.tick(1)
    rb.tick(1)
    shown = rb.rollout(rollout["id"])
    joined = next(d for d in shown["decisions"] if d["kind"] == "device_joined")
    assert joined["figures"]["device_id"] == late
    versions = rb.versions()
    assert versions[late] == "2.0" and versions["other-00"] == "1.0"
    assert all(versions[i] == "2.0" for i in ids)


def test_pause_resume_abort_and_promote_follow_the_documented_states(rb: RolloutBench) -> None:
    ids = rb.enrol(4)
    rollout = rb.create(waves=[{"count": 1, "bake_seconds": 600}, {"percent": 100, "bake_seconds": 600}], gates=GATES)
    rid = rollout["id"]
    rb.tick(1)

    def command(name: str, body: dict[str, object] | None = None) -> tuple[int, dict[str, object]]:
        response = rb.client.post(f"/api/v1/rollouts/{rid}/{name}", json=body, headers=rb.auth)
        return response.status_code, response.json()

    status, body = command("resume")
    assert status == 409 and body["detail"] == f"rollout {rid}: cannot resume a running rollout: it is not paused"
    status, body = command("pause", {"reason": "lunch"})
    assert status == 202 and body["applied"] is False  # no runner thread: queued for the next step
    rb.tick(1)
    assert rb.rollout(rid)["status"] == "paused" and rb.rollout(rid)["reason"] == "lunch"
    assert command("pause")[0] == 409
    dispatched = len(rb.dispatches(rid))
    rb.tick(1)
    rb.enrol(1, prefix="late")  # a paused rollout takes joiners in but dispatches nothing
    rb.tick(1)
    assert len(rb.dispatches(rid)) == dispatched

    assert command("resume")[0] == 202
    rb.tick(1)
    assert rb.rollout(rid)["status"] in {"running", "baking"}
    assert command("promote")[0] == 202
    rb.tick(1)
    assert rb.rollout(rid)["current_wave"] == 1
    assert any(d["kind"] == "wave_promoted" for d in rb.rollout(rid)["decisions"])

    assert command("abort", {"rollback": True, "reason": "enough"})[0] == 202
    for _ in range(4):
        rb.tick(1)
    shown = rb.rollout(rid)
    assert shown["status"] == "rolled_back"
    assert set(rb.versions().values()) == {"1.0"}
    assert command("abort")[0] == 409
    assert ids  # every device of the fleet was enrolled


def test_status_poll_asks_for_no_device_rows_and_still_gets_the_counts(rb: RolloutBench) -> None:
    ids = rb.enrol(6)
    rollout = rb.create(waves=[{"count": 2, "bake_seconds": 30}, {"percent": 100}], gates=NO_GATES)
    rb.tick(1)
    full = rb.rollout(rollout["id"])
    get = rb.client.get
    url = f"/api/v1/rollouts/{rollout['id']}"
    poll = get(url, params={"devices": 0}).json()
    assert poll["devices"] == [] and poll["device_count"] == 6 == len(full["devices"])
    assert poll["counts"] == full["counts"] and sum(full["counts"].values()) == 6
    assert {k: v for k, v in poll.items() if k != "devices"} == {k: v for k, v in full.items() if k != "devices"}
    first = get(url, params={"devices": 2}).json()["devices"]
    assert first == full["devices"][:2] and [d["device_id"] for d in first] == sorted(ids)[:2]
    assert [d["device_id"] for d in full["devices"]] == sorted(ids)
    dispatched = [d for d in full["devices"] if d["phase"] != "pending"]
    assert len(dispatched) == 2 and {d["wave_number"] for d in dispatched} == {1}
    refused = get(url, params={"devices": -1})
    assert refused.status_code == 422 and "devices" in refused.text


def test_status_poll_shows_a_state_another_writer_changed_without_touching_updated_at(rb: RolloutBench) -> None:
    rb.enrol(3)
    rid = rb.create(waves=[{"percent": 100}], max_concurrent_downloads=1, gates=NO_GATES)["id"]
    rb.tick(1)
    before = rb.rollout(rid)  # decoded and kept by the status views
    assert before["counts"] == {"dispatched": 1, "pending": 2}
    with Session(rb.coordinator.engine) as session:  # e.g. another replica's step in the same clock tick
        row = session.get(Rollout, rid)
        assert row is not None
        stamp, state = row.updated_at, dict(row.state)
        state["reason"] = "changed elsewhere"
        row.state = state
        session.add(row)
        session.commit()
        assert row.updated_at == stamp
    after = rb.rollout(rid)
    assert after["reason"] == "changed elsewhere" and before["reason"] != after["reason"]
    with Session(rb.coordinator.engine) as session:
        session.execute(update(Rollout).where(col(Rollout.id) == rid).values(format_version=99))
        session.commit()
    refused = rb.client.get(f"/api/v1/rollouts/{rid}", params={"devices": 0})
    assert refused.status_code >= 400 and "state format 99" in refused.text


def test_invalid_plans_conflicts_and_unknown_rollouts_are_refused_clearly(rb: RolloutBench) -> None:
    rb.enrol(2)
    post = rb.client.post
    response = post(
        "/api/v1/rollouts", json={"model": "digits", "version": "2.0", "waves": [{"percent": 50}]}, headers=rb.auth
    )
    assert response.status_code == 422 and "allow_partial" in response.json()["detail"]
    response = post(
        "/api/v1/rollouts", json={"model": "digits", "version": "2.0", "gates": {"max_psy": 0.1}}, headers=rb.auth
    )
    assert response.status_code == 422 and response.json()["field"] == "body.gates.max_psy"
    response = post("/api/v1/rollouts", json={"model": "digits", "version": "9.9"}, headers=rb.auth)
    assert response.status_code == 404 and "9.9" in response.json()["detail"]
    response = post(
        "/api/v1/rollouts",
        json={"model": "digits", "version": "2.0", "selector": {"tags": {"a": "b"}}},
        headers=rb.auth,
    )
    assert response.status_code == 422 and response.json()["field"] == "selector"
    anonymous = TestClient(rb.client.app)
    assert anonymous.post("/api/v1/rollouts", json={"model": "digits", "version": "2.0"}).status_code == 401
    first = rb.create()
    response = post("/api/v1/rollouts", json={"model": "digits", "version": "2.0"}, headers=rb.auth)
    assert response.status_code == 409 and f"rollout {first['id']}" in response.json()["detail"]
    assert rb.client.get("/api/v1/rollouts/999").status_code == 404
    assert rb.client.post("/api/v1/rollouts/999/pause", headers=rb.auth).status_code == 404
    listing = rb.client.get("/api/v1/rollouts").json()
    assert listing["count"] == 1 and listing["data"][0]["status"] == "pending"


ABSOLUTE = {"max_error_rate": 0.01, "max_p95_ms": 50, "min_inferences": 50, "min_class_samples": 50}


def test_first_rollout_of_a_new_model_completes_on_absolute_gates_and_numbers_waves_from_one(
    rb: RolloutBench,
) -> None:
    rb.enrol(4, version=None)  # devices serving no model yet: there is no control cohort
    rollout = rb.create(
        previous_version=None,
        waves=[{"count": 1, "bake_seconds": 30}, {"percent": 100, "bake_seconds": 30}],
        gates=ABSOLUTE,
        max_data_wait_seconds=60,
    )
    assert rollout["baseline"] == "absolute" and rollout["plan"]["baseline"] == "absolute"
    rid = rollout["id"]
    for _ in range(20):
        rb.tick(10)
        shown = rb.rollout(rid)
        if shown["status"] != "running" and shown["status"] != "baking":
            break
        for device_id in updated_ids(rb, rid):
            rb.telemetry(device_id, "2.0", latency_ms=8.0)
    assert shown["status"] == "completed", [d["message"] for d in shown["decisions"]]
    assert set(rb.versions().values()) == {"2.0"}
    assert (shown["current_wave"], shown["current_wave_number"], shown["wave_count"]) == (1, 2, 2)
    assert [(w["index"], w["number"]) for w in shown["waves"]] == [(0, 1), (1, 2)]
    assert {(d["wave"] + 1) == d["wave_number"] for d in shown["devices"]} == {True}
    passed = [d for d in shown["decisions"] if d["kind"] == "gate_passed"]
    assert [(d["figures"]["wave"], d["figures"]["wave_number"]) for d in passed] == [(0, 1), (1, 2)]
    assert passed[0]["message"].startswith("wave 1 gates passed: install_failure_rate: passed")
    results = {r["name"]: r["verdict"] for r in passed[0]["figures"]["report"]["results"]}
    assert results["error_rate"] == results["p95_latency_ms"] == "passed"
    assert results["class_shift_psi"] == "not_applicable"
    assert shown["gates"]["wave_number"] == 2 and shown["gates"]["live"] is False
    kinds = [d["kind"] for d in shown["decisions"]]
    assert "control_mismatch" not in kinds and "gates_waiting" not in kinds


def test_comparison_with_a_control_cohort_serving_no_model_is_named_then_max_data_wait_pauses(
    rb: RolloutBench,
) -> None:
    rb.enrol(4, version=None)
    rollout = rb.create(  # previous_version 1.0: compared with a control cohort, which runs nothing of it
        waves=[{"count": 1, "bake_seconds": 30}, {"percent": 100, "bake_seconds": 30}],
        gates=GATES,
        max_data_wait_seconds=60,
    )
    rid = rollout["id"]
    assert rollout["baseline"] == "control"
    rb.tick(1)
    rb.tick(1)
    shown = rb.rollout(rid)
    assert shown["status"] == "baking"
    mismatch = next(d for d in shown["decisions"] if d["kind"] == "control_mismatch")
    assert mismatch["figures"]["wave_number"] == 1
    assert "the control cohort serves no model on 3 devices, not digits:1.0" in mismatch["message"]
    assert "no model on 3 devices" in shown["waiting"]
    (listed,) = rb.client.get("/api/v1/rollouts").json()["data"]
    assert listed["waiting"] == shown["waiting"]
    for _ in range(3):  # the bake ends: what is missing is said once
        rb.tick(10)
        for device_id in updated_ids(rb, rid):
            rb.telemetry(device_id, "2.0")
    kinds = [d["kind"] for d in rb.rollout(rid)["decisions"]]
    assert kinds.count("gates_waiting") == 1 and kinds.count("control_mismatch") == 1
    for _ in range(7):
        rb.tick(10)
    shown = rb.rollout(rid)
    assert shown["status"] == "paused"
    inconclusive = next(d for d in shown["decisions"] if d["kind"] == "gate_inconclusive")
    assert inconclusive["message"].startswith("wave 1 gates still lack data 60 s after the bake")
    assert (
        "control cohort has 0 inferences, needs 50 (its devices serve no model on 3 devices)"
        in (inconclusive["message"])
    )
    assert shown["reason"].startswith("insufficient data after waiting 60 s: error_rate_increase")
    assert shown["waiting"] is None


def test_promote_to_a_wave_number_through_the_api_starts_that_wave(rb: RolloutBench) -> None:
    rb.enrol(8)
    waves = [{"count": 1, "bake_seconds": 600}, {"count": 3, "bake_seconds": 600}, {"percent": 100}]
    rid = rb.create(waves=waves, gates=NO_GATES)["id"]
    rb.tick(1)

    def promote(body: dict[str, object]) -> tuple[int, dict[str, object]]:
        response = rb.client.post(f"/api/v1/rollouts/{rid}/promote", json=body, headers=rb.auth)
        return response.status_code, response.json()

    status, body = promote({"wave_number": 2, "to_percent": 50})
    assert status == 422 and body["detail"] == "promote to a wave_number or to_percent, not both"
    assert promote({"wave_number": 3})[0] == 202
    rb.tick(1)
    shown = rb.rollout(rid)
    assert shown["current_wave_number"] == 3 and shown["status"] == "running"
    promoted = next(d for d in shown["decisions"] if d["kind"] == "wave_promoted")
    assert (promoted["figures"]["wave_number"], promoted["figures"]["to_wave_number"]) == (1, 3)
    assert len(rb.dispatches(rid)) == 8, "the devices of waves 2 and 3 were all dispatched"
    status, body = promote({"wave_number": 3})
    assert status == 409
    assert body["detail"] == f"rollout {rid}: cannot promote: wave 3 is already under way (the current wave is 3)"


def test_runner_reads_the_state_another_replica_stored_since_its_own_last_step(rb: RolloutBench) -> None:
    ids = rb.enrol(4)
    rollout = rb.create(waves=[{"percent": 100, "bake_seconds": 0}], max_concurrent_downloads=2, gates=NO_GATES)
    rb.tick(1)  # rb.runner dispatches two devices (and keeps the state it stored); they update
    assert len(rb.recorder.published) == 2
    replica = Recorder()
    rb.new_runner(replica).tick(rb.now + timedelta(seconds=0.5))  # took the rollout over: two done, two dispatched
    assert sorted(s.device_id for s in replica.published + rb.recorder.published) == ids
    rb.tick(1)  # back on rb.runner: it must step the replica's state, not the copy of its own last step
    assert rb.recorder.new() == [], "nothing dispatched again"
    for state in replica.published:
        rb.answer(state)
    rb.tick(1)
    assert rb.rollout(rollout["id"])["status"] == "completed"
    updated = Counter(d.figures["device_id"] for d in rb.decisions(rollout["id"]) if d.kind == "device_updated")
    assert updated == dict.fromkeys(ids, 1), "each device updated once, no decision taken twice"
    assert Counter(d.device_id for d in rb.dispatches(rollout["id"])) == dict.fromkeys(ids, 1)


def test_runner_rests_twice_as_long_as_a_slow_tick_took_but_renews_its_leases_in_time() -> None:
    engine = create_engine("sqlite://")  # pure arithmetic: never connected to
    runner = RolloutRunner(engine=engine, publisher=Recorder(), links=lambda: None, tick_s=0.2)
    assert runner.rest_after(0.01) == 0.2, "a cheap tick keeps the configured period"
    assert runner.rest_after(0.5) == 1.0, "a tick of a large rollout is followed by twice its time"
    replica = RolloutRunner(
        engine=engine,
        publisher=Recorder(),
        links=lambda: None,
        tick_s=0.2,
        leases=Leases(engine, "replica-a", ttl_s=3.0),
    )
    assert replica.rest_after(0.5) == 1.0
    assert replica.rest_after(4.0) == 1.0, "never so long that the leases (3 s) expire before the next renewal"
