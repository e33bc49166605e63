"""A batch of reported states and events (`ingest_batch`) ends exactly as the same messages applied one by one."""

from __future__ import annotations

from datetime import UTC, timedelta, timezone
from typing import Any

from sqlmodel import Session, col, select

from cloud.models import Deployment, DeploymentTarget, Device, DeviceEventRecord
from cloud.services.devices import ingest_batch, ingest_event, ingest_reported
from protocol.messages import DeviceEvent, EventKind, ReportedState, UpdatePhase, UpdateStatus, utcnow
from tests.cloud.conftest import Api
from tests.cloud.fleet_helpers import enrol

START = utcnow() - timedelta(minutes=1)


def rollout_messages(first: str, second: str) -> list[ReportedState | DeviceEvent]:
    """Two devices' updates interleaved: `first` activates generation 1, `second` fails it."""

    def reported(device_id: str, phase: UpdatePhase, seconds: int) -> ReportedState:
        update = UpdateStatus(generation=1, phase=phase)
        return ReportedState(device_id=device_id, update=update, reported_at=START + timedelta(seconds=seconds))

    def event(device_id: str, kind: EventKind, phase: UpdatePhase | None = None) -> DeviceEvent:
        return DeviceEvent(device_id=device_id, kind=kind, generation=1, phase=phase, message=f"{kind} {phase}")

    return [
        event(first, EventKind.UPDATE_STARTED, UpdatePhase.DOWNLOADING),
        event(second, EventKind.UPDATE_STARTED, UpdatePhase.DOWNLOADING),
        reported(first, UpdatePhase.DOWNLOADING, 1),
        event(second, EventKind.UPDATE_PROGRESS, UpdatePhase.VERIFYING),
        reported(second, UpdatePhase.VERIFYING, 2),
        event(first, EventKind.UPDATE_PROGRESS, UpdatePhase.VERIFYING),
        reported(first, UpdatePhase.VERIFYING, 3),
        event(first, EventKind.UPDATE_ACTIVATED),
        event(second, EventKind.UPDATE_FAILED),
        reported(first, UpdatePhase.ACTIVE, 4),
        reported(second, UpdatePhase.FAILED, 5),
        reported(second, UpdatePhase.VERIFYING, 0),  # an older report delivered late: changes no state
    ]


def prepare(session: Session, device_ids: list[str]) -> None:
    """Each device given generation 1 by one deployment."""
    deployment = Deployment(model_name="m", model_version="1", sha256="0" * 64, target={})
    session.add(deployment)
    session.flush()
    assert deployment.id is not None
    for device_id in device_ids:
        device = session.get(Device, device_id)
        assert device is not None
        device.desired_generation = 1
        session.add(device)
        session.add(DeploymentTarget(deployment_id=deployment.id, device_id=device_id, generation=1))
    session.commit()


def outcome(session: Session, device_id: str) -> tuple[Any, ...]:
    """What the messages left of a device: its row, its targets and its events in the order stored."""
    device = session.get(Device, device_id)
    assert device is not None
    targets = session.exec(select(DeploymentTarget).where(DeploymentTarget.device_id == device_id)).all()
    events = session.exec(
        select(DeviceEventRecord)
        .where(DeviceEventRecord.device_id == device_id, col(DeviceEventRecord.kind).startswith("update."))
        .order_by(col(DeviceEventRecord.id))
    ).all()
    return (
        (device.update_phase, device.reported_generation, device.last_error_code, device.status, device.anomaly),
        [(t.status, t.phase, t.error_code) for t in targets],
        [(e.kind, e.generation, e.phase, e.message) for e in events],
    )


def renamed(message: ReportedState | DeviceEvent, device_id: str) -> ReportedState | DeviceEvent:
    return message.model_copy(update={"device_id": device_id})


def test_batch_of_interleaved_phases_stores_each_devices_last_state_and_every_event_in_order(api: Api) -> None:
    for device_id in ("batch-a", "batch-b", "single-a", "single-b"):
        enrol(api.coordinator, device_id)
    engine = api.coordinator.engine
    with Session(engine) as session:
        prepare(session, ["batch-a", "batch-b", "single-a", "single-b"])
    messages = rollout_messages("batch-a", "batch-b")
    stranger = ReportedState(device_id="never-enrolled")
    with Session(engine) as session:
        batch = [(m, True) for m in messages[:6]] + [(stranger, True)] + [(m, True) for m in messages[6:]]
        unknown = ingest_batch(session=session, messages=batch)
    assert list(unknown) == [6] and "not enrolled" in unknown[6]
    names = {"batch-a": "single-a", "batch-b": "single-b"}
    for message in messages:  # the same messages, one transaction each, on two other devices
        with Session(engine) as session:
            single = renamed(message, names[message.device_id])
            if isinstance(single, ReportedState):
                ingest_reported(session=session, state=single)
            else:
                ingest_event(session=session, event=single)
    with Session(engine) as session:
        first, second = outcome(session, "batch-a"), outcome(session, "batch-b")
        assert first == outcome(session, "single-a") and second == outcome(session, "single-b")
    assert first[0][:2] == ("active", 1) and first[1] == [("succeeded", "active", None)]
    assert second[0][:3] == ("failed", 1, "internal") and second[1][0][:2] == ("failed", "failed")
    kinds = [kind for kind, *_ in first[2]]
    assert kinds == ["update.started", "update.progress", "update.activated"], "events lost or reordered"


def test_an_event_delivered_again_is_recorded_once_in_its_batch_in_a_later_one_and_alone(api: Api) -> None:
    enrol(api.coordinator, "again")
    engine = api.coordinator.engine
    with Session(engine) as session:
        prepare(session, ["again"])
    started = DeviceEvent(device_id="again", kind=EventKind.UPDATE_STARTED, generation=1, phase=UpdatePhase.DOWNLOADING)
    # Another kind at the same instant is another event; the same instant written with another offset is not.
    progress = DeviceEvent(
        device_id="again", kind=EventKind.UPDATE_PROGRESS, generation=1, phase=UpdatePhase.VERIFYING, at=started.at
    )
    shifted = started.model_copy(update={"at": started.at.astimezone(timezone(timedelta(hours=2)))})
    activated = DeviceEvent(device_id="again", kind=EventKind.UPDATE_ACTIVATED, generation=1)
    with Session(engine) as session:
        ingest_batch(session=session, messages=[(started, True), (started, False), (progress, True)])
    with Session(engine) as session:  # the broker hands them again after a restart, the next one with them
        ingest_batch(session=session, messages=[(shifted, False), (progress, False), (activated, True)])
    with Session(engine) as session:
        ingest_event(session=session, event=activated, live=False)
        _, targets, events = outcome(session, "again")
        (stored,) = session.exec(
            select(DeviceEventRecord.at).where(
                DeviceEventRecord.device_id == "again", DeviceEventRecord.kind == EventKind.UPDATE_STARTED.value
            )
        ).all()
    assert [kind for kind, *_ in events] == ["update.started", "update.progress", "update.activated"]
    assert targets == [("succeeded", "active", None)]
    assert (stored if stored.tzinfo else stored.replace(tzinfo=UTC)) == started.at, "the instant the device sent"
