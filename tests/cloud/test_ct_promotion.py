"""A person approves the promotion of a continuous-training candidate: the rollout engine holds after the canary
wave passed its gates (`hold_after_waves`), the turn waits in `awaiting_promotion`, and `ct approve` promotes the
next wave while `ct reject` aborts the rollout and rolls the canary back, each audited."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlmodel import Session, col, select

from cloud.ct import service as ct
from cloud.ct.service import CtContext
from cloud.errors import ConflictError, InvalidInputError
from cloud.models import AuditEntry, CtAction, CtActionStatus, CtPolicyBase, Rollout, RolloutCommandRecord
from cloud.rollouts import Promote, RolloutPlan, RolloutStatus
from cloud.rollouts import service as rollouts
from cloud.rollouts.plan import HELD_FOR_PROMOTION
from cloud.rollouts.state import DevicePhase, DeviceRecord, RolloutState
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol
from tests.cloud.rollouts.sim import Sim, fleet_of

CANARY = [{"count": 1, "bake_seconds": 60}, {"percent": 100, "bake_seconds": 60}]


def canary_plan(**fields: object) -> RolloutPlan:
    base = {"model": "digits", "version": "1.1", "previous_version": "1.0", "waves": CANARY}
    return RolloutPlan.model_validate({**base, **fields})


def test_a_plan_holding_after_its_canary_wave_pauses_there_until_promoted() -> None:
    sim = Sim(canary_plan(hold_after_waves=[1]), fleet_of(10))
    sim.step()
    sim.run_updates()
    assert sim.status is RolloutStatus.PAUSED and sim.state.current_wave == 0
    assert HELD_FOR_PROMOTION in (sim.state.reason or "")
    assert sim.kinds()[-2:] == ["gate_passed", "rollout_paused"]
    assert sim.in_wave(1) and all(sim.state.devices[d].phase is DevicePhase.PENDING for d in sim.in_wave(1))
    _, decisions = sim.step(commands=[Promote(command_id="p1", by="bob")])
    assert [d.kind for d in decisions][:2] == ["wave_promoted", "wave_started"] and sim.state.current_wave == 1
    sim.run_updates()
    assert sim.status is RolloutStatus.COMPLETED


def test_a_plan_without_a_hold_goes_straight_on_and_a_hold_after_the_last_wave_is_refused() -> None:
    sim = Sim(canary_plan(), fleet_of(10))
    sim.step()
    sim.run_updates()
    assert sim.status is RolloutStatus.COMPLETED
    with pytest.raises(ValueError, match="hold_after_waves"):
        canary_plan(hold_after_waves=[2])


@pytest.fixture
def held(api: Api, digits_model_bytes: bytes, tmp_path: Path) -> tuple[Api, int, int]:
    """A `wait_for promote` policy's turn whose canary rollout (1.0 → 1.1 on site b) passed its canary wave and is
    held there, as the engine leaves it; (api, turn id, rollout id)."""
    api.push("digits", "1.0", digits_model_bytes)
    api.push("digits", "1.1", digits_model_bytes)
    for device_id in ("b-1", "b-2"):
        enrol(api.coordinator, device_id, tags={"site": "b"})
    engine = api.coordinator.engine
    with Session(engine, expire_on_commit=False) as session:
        policy = ct.set_policy(
            session=session, body=CtPolicyBase(model_name="digits", by="site", wait_for="promote"), actor="alice"
        )
        plan = canary_plan(selector={"tags": {"site": "b"}}, hold_after_waves=[1])
        row = rollouts.create_rollout(session=session, plan=plan, actor="ct:coordinator")
        state = RolloutState.new(rollouts.engine_id(row.id or 0)).model_copy(
            update={
                "status": RolloutStatus.PAUSED, "paused_from": RolloutStatus.BAKING,
                "reason": f"wave 1 passed its gates; {HELD_FOR_PROMOTION}",
                "devices": {"b-1": DeviceRecord(wave=0, phase=DevicePhase.SUCCEEDED), "b-2": DeviceRecord(wave=1)},
            }
        )  # fmt: skip
        row.state, row.status = state.model_dump(mode="json"), RolloutStatus.PAUSED.value
        action = CtAction(
            policy_id=policy.id or 0, model_name="digits", version="1.0", cohort="site=b",
            status=CtActionStatus.ROLLING_OUT.value, candidate_version="1.1", rollout_id=row.id,
        )  # fmt: skip
        session.add_all([row, action])
        session.commit()
        context = CtContext(flower_enabled=False, data_dir=tmp_path, nodes=lambda *a, **k: set())
        ct.step(session=session, context=context)
        ct.step(session=session, context=context)  # a second tick changes nothing
        session.refresh(action)
        assert action.status == "awaiting_promotion" and f"ct approve {action.id}" in action.detail
        return api, action.id or 0, row.id or 0


def _commands(api: Api, rollout_id: int) -> list[dict[str, object]]:
    with Session(api.coordinator.engine) as session:
        rows = session.exec(select(RolloutCommandRecord).where(RolloutCommandRecord.rollout_id == rollout_id))
        return [dict(r.body) for r in rows]


def _ct_audit(api: Api) -> list[tuple[str, str]]:
    with Session(api.coordinator.engine) as session:
        entries = session.exec(select(AuditEntry).order_by(col(AuditEntry.seq)))
        return [(e.actor, e.action) for e in entries if e.action.startswith(("ct.", "rollout.promoted", "rollout.ab"))]


def test_approving_a_held_canary_promotes_the_rest_of_the_cohort(
    held: tuple[Api, int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    api, turn, rollout_id = held
    status = ok_json(in_process_cli(api, monkeypatch)("ct", "status", "--json"))
    assert [(a["id"], a["status"]) for a in status["actions"]] == [(turn, "awaiting_promotion")]
    approved = ok_json(in_process_cli(api, monkeypatch)("ct", "approve", str(turn), "--json"))
    assert (approved["status"], approved["approved_by"]) == ("rolling_out", "admin")
    [command] = _commands(api, rollout_id)
    assert (command["kind"], command["by"]) == ("promote", "admin")
    assert _ct_audit(api)[-3:] == [
        ("coordinator", "ct.awaiting_promotion"), ("admin", "rollout.promoted"), ("admin", "ct.rolling_out"),
    ]  # fmt: skip
    again = api.client.post(f"/api/v1/ct/actions/{turn}/approve")
    assert again.status_code == 409 and "nothing waits" in again.text


def test_rejecting_a_held_canary_aborts_the_rollout_and_rolls_it_back(held: tuple[Api, int, int]) -> None:
    api, turn, rollout_id = held
    rejected = api.client.post(f"/api/v1/ct/actions/{turn}/reject", json={"reason": "site b recalibrates"})
    assert rejected.status_code == 200, rejected.text
    body = rejected.json()
    assert body["status"] == "rejected" and "site b recalibrates" in body["detail"] and "rolled back" in body["detail"]
    [command] = _commands(api, rollout_id)
    assert (command["kind"], command["rollback"]) == ("abort", True) and "site b recalibrates" in str(command["reason"])
    assert _ct_audit(api)[-2:] == [("admin", "rollout.aborted"), ("admin", "ct.rejected")]


def test_a_rollout_promoted_by_hand_takes_the_turn_back_to_rolling_out(
    held: tuple[Api, int, int], tmp_path: Path
) -> None:
    api, turn, rollout_id = held
    with Session(api.coordinator.engine, expire_on_commit=False) as session:
        row = session.get(Rollout, rollout_id)
        assert row is not None
        row.status, row.state = RolloutStatus.RUNNING.value, {**row.state, "status": "running", "reason": None}
        session.add(row)
        session.commit()
        ct.step(session=session, context=CtContext(flower_enabled=False, data_dir=tmp_path, nodes=lambda *a: set()))
        assert ct.get_action(session=session, action_id=turn).status == "rolling_out"
        with pytest.raises(ConflictError, match="only a waiting step"):
            ct.reject_action(session=session, action_id=turn, actor="bob")


def test_promote_waits_only_with_a_canary_and_sets_the_hold_in_the_run() -> None:
    with pytest.raises(InvalidInputError, match="needs rollout canary"):
        ct._check_policy(CtPolicyBase(model_name="m", wait_for="promote", rollout="none"))
    ct._check_policy(CtPolicyBase(model_name="m", wait_for="retrain,promote"))
    from cloud.models import CtPolicy

    policy = CtPolicy(model_name="m", wait_for="promote", rollout_plan={"on_gate_failure": "pause"})
    assert ct._canary_plan(policy) == {"on_gate_failure": "pause", "hold_after_waves": [1]}
    assert ct._canary_plan(CtPolicy(model_name="m", wait_for="retrain")) is None
