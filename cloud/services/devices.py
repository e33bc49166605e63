"""Devices as their messages describe them: reported state and events (of enrolled devices only).

Tags are the coordinator's, set at enrolment: tags a device reports are ignored.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import insert, update
from sqlalchemy.orm import QueryableAttribute, defer
from sqlmodel import Session, col, select

from cloud.models import (
    DeploymentTarget,
    Device,
    DeviceCertificate,
    DeviceCertificatePublic,
    DeviceDetailPublic,
    DeviceEventPublic,
    DeviceEventRecord,
    DevicePublic,
    ModelVersion,
    TargetStatus,
    TelemetryGapsPublic,
    as_utc,
)
from cloud.services.enrolment import UnknownDeviceError, enrolled_device, require_device
from cloud.telemetry.gaps import telemetry_health
from cloud.telemetry.windows import telemetry_totals
from protocol.errors import ErrorCode
from protocol.messages import (
    DeviceEvent,
    DeviceStatus,
    ErrorInfo,
    EventKind,
    ReportedState,
    UpdatePhase,
    utcnow,
)

__all__ = [
    "CLOCK_SKEW",
    "GENERATION_AHEAD",
    "UNCONFIRMED",
    "confirm_heard",
    "confirm_heard_all",
    "device_detail",
    "device_events",
    "device_public",
    "devices_public",
    "generation_anomaly",
    "get_device",
    "ingest_batch",
    "ingest_event",
    "ingest_reported",
    "mark_unconfirmed",
    "report_time",
    "target_status_for_phase",
]

log = logging.getLogger(__name__)

# Connectivity of a device not heard from since the coordinator started (its last status was `online`). A
# coordinator-side value: the wire's `DeviceStatus` (what a device says of itself) stays online/offline.
UNCONFIRMED = "unknown"
# How far ahead of the coordinator's clock a device's `reported_at` may be and still count as its own time.
CLOCK_SKEW = timedelta(seconds=60)
# Event kind recorded when a device reports a generation this coordinator never issued.
GENERATION_AHEAD = "security.generation_ahead"

# A batch's deployment targets, loaded at once (`ingest_batch`): (device id, generation) → its targets.
Targets = dict[tuple[str, int], list[DeploymentTarget]]


def target_status_for_phase(phase: UpdatePhase) -> TargetStatus:
    """How a deployment target stands when its device reports `phase` for the target's generation."""
    if phase is UpdatePhase.ACTIVE:
        return TargetStatus.SUCCEEDED
    if phase is UpdatePhase.FAILED:
        return TargetStatus.FAILED
    if phase is UpdatePhase.IDLE:
        return TargetStatus.PENDING
    return TargetStatus.IN_PROGRESS


def ingest_reported(
    *, session: Session, state: ReportedState, live: bool = True, commit: bool = True, targets: Targets | None = None
) -> Device:
    """Apply a reported state. A last will (`status=offline`) only flips connectivity.

    `live=False` is a report the broker replays from its store (a retained message, or one queued before the
    broker restarted) rather than one the device just sent: its content is applied, but it is no sign of
    life, so it never makes the device `online` nor moves `last_seen`. `commit=False`: left for the caller to commit
    (a batch of messages in one transaction). `targets`: the batch's deployment targets, loaded already.
    """
    device = _apply_reported(session, state, live, targets, None)
    _finish(session, commit)
    return device


def _apply_reported(
    session: Session, state: ReportedState, live: bool, targets: Targets | None, events: list[dict[str, Any]] | None
) -> Device:
    """`ingest_reported` without the commit; `events`: a batch's event rows, to insert at its end (else added).

    The device comes from `session` (`enrolled_device`), so what is set on it is written at the commit without a
    `session.add` (whose cascade walk cost more than the message's other writes)."""
    device = enrolled_device(session=session, device_id=state.device_id)
    now = utcnow()
    if state.status is DeviceStatus.OFFLINE:
        device.status = DeviceStatus.OFFLINE.value
        return device
    reported_at = report_time(state.reported_at, now)
    last = as_utc(device.last_reported_at)
    if last is not None and reported_at < last:
        # An older report delivered late (e.g. a retained one replayed after ours); connectivity only.
        if live:
            device.status = DeviceStatus.ONLINE.value
            device.last_seen = now
        return device
    if live:
        device.status = DeviceStatus.ONLINE.value
        device.last_seen = now
    device.last_reported_at = reported_at
    device.agent_version = state.agent_version
    device.inference_url = state.inference_url
    device.capabilities = state.capabilities.model_dump(mode="json") if state.capabilities else None
    active = state.active_model
    device.active_model_name = active.name if active else None
    device.active_model_version = active.version if active else None
    device.active_model_sha256 = active.sha256 if active else None
    if state.update is not None:
        device.reported_generation = state.update.generation
        device.update_phase = state.update.phase.value
        _check_generation(session, device, state.update.generation, events)
        if state.update.error is not None:
            _record_error(device, state.update.error)
        _advance_targets(
            session,
            device_id=device.id,
            generation=state.update.generation,
            phase=state.update.phase,
            error=state.update.error,
            targets=targets,
        )
    return device


def mark_unconfirmed(*, session: Session) -> int:
    """At the start of a coordinator on its embedded broker: `online` devices become `unknown` until heard from.

    A device's last will is the broker's to publish; an embedded broker killed with the coordinator publishes
    none, so an `online` from before the start proves nothing. Returns how many devices were marked.
    """
    marked = session.exec(
        update(Device).where(col(Device.status) == DeviceStatus.ONLINE.value).values(status=UNCONFIRMED)
    )
    session.commit()
    return int(getattr(marked, "rowcount", 0) or 0)


def confirm_heard(*, session: Session, device_id: str) -> bool:
    """A device sent something on a live session: `unknown` becomes `online` (nothing else changes); True if so."""
    confirmed = session.exec(
        update(Device)
        .where(col(Device.id) == device_id, col(Device.status) == UNCONFIRMED)
        .values(status=DeviceStatus.ONLINE.value, last_seen=utcnow())
    )
    session.commit()
    return bool(getattr(confirmed, "rowcount", 0))


def report_time(reported_at: datetime, now: datetime, skew: timedelta = CLOCK_SKEW) -> datetime:
    """When a report counts as made, for ordering: its own time, or `now` if that is more than `skew` ahead. Pure.

    A device whose clock runs in the future (year 2099) would otherwise make every later honest report look older.
    """
    return now if reported_at > now + skew else reported_at


def generation_anomaly(reported: int, desired: int) -> str | None:
    """Why a reported update generation cannot be trusted, or None when it can. Pure."""
    if reported <= desired:
        return None
    return (
        f"reported generation {reported} is above the desired {desired}: "
        "it ran a desired state this coordinator never issued"
    )


def _check_generation(
    session: Session, device: Device, reported: int, events: list[dict[str, Any]] | None = None
) -> None:
    """Flag (once, with a security event) or clear the device's anomaly from its reported generation (`events`: a
    batch's event rows, where the security event goes instead of into the session)."""
    anomaly = generation_anomaly(reported, device.desired_generation)
    if anomaly == device.anomaly:
        return
    if anomaly is None:
        log.info(
            "device anomaly cleared device=%s generation=%d desired=%d", device.id, reported, device.desired_generation
        )
    else:
        log.warning("device anomaly device=%s: %s", device.id, anomaly)
        row = _event_row(device_id=device.id, kind=GENERATION_AHEAD, generation=reported, message=anomaly)
        if events is None:
            session.add(DeviceEventRecord(**row))
        else:
            events.append(row)
    device.anomaly = anomaly


def ingest_event(
    *, session: Session, event: DeviceEvent, live: bool = True, commit: bool = True, targets: Targets | None = None
) -> DeviceEventRecord:
    """Record an event; a failure stores its error on the device and on the deployment target.

    `live=False`: the broker replays it from its store (sent before a restart), so it does not move `last_seen`.
    `commit=False`: left for the caller to commit (a batch of messages in one transaction). `targets`: the batch's
    deployment targets, loaded already.
    """
    row = _apply_event(session, event, live, targets)
    if _stored_events(session, [row]):  # delivered again: applied again, which changes nothing, not recorded twice
        device_id, kind, at = _event_key(row)
        earlier = session.exec(
            select(DeviceEventRecord).where(
                DeviceEventRecord.device_id == device_id, DeviceEventRecord.kind == kind, DeviceEventRecord.at == at
            )
        ).first()
        if earlier is not None:
            _finish(session, commit)
            return earlier
    record = DeviceEventRecord(**row)
    session.add(record)
    if commit:
        session.commit()
        session.refresh(record)
    return record


def _event_key(row: dict[str, Any]) -> tuple[str, str, datetime]:
    """What makes a device's event the same event delivered again: its device, kind and the device's own time."""
    return row["device_id"], row["kind"], row["at"]


def _stored_events(session: Session, rows: Sequence[dict[str, Any]]) -> set[tuple[str, str, datetime]]:
    """Of the device events `rows`, the `_event_key`s stored already (one query, three columns).

    MQTT delivers at least once: a coordinator killed between its commit and its PUBACK gets the event again from
    the broker. Events carry no sequence number, so their device's timestamp (microseconds, UTC) names them."""
    if not rows:
        return set()
    wanted = {_event_key(row) for row in rows}
    statement = select(DeviceEventRecord.device_id, DeviceEventRecord.kind, DeviceEventRecord.at).where(
        col(DeviceEventRecord.device_id).in_(sorted({key[0] for key in wanted})),
        col(DeviceEventRecord.at).in_(sorted({key[2] for key in wanted})),
    )
    stored = {(device_id, kind, _instant(at)) for device_id, kind, at in session.exec(statement)}
    return stored & wanted


def _instant(value: datetime) -> datetime:
    """`value` in UTC, zone-aware (SQLite gives back what it stored without its zone: UTC, see `_apply_event`)."""
    return cast(datetime, as_utc(value)).astimezone(UTC)


def _event_row(
    *,
    device_id: str,
    kind: str,
    generation: int | None = None,
    phase: str | None = None,
    message: str = "",
    error_code: str | None = None,
    error_message: str | None = None,
    at: datetime | None = None,
) -> dict[str, Any]:
    """The column values of a `DeviceEventRecord` (`at`, `received_at`: now unless given)."""
    now = utcnow()
    return {
        "device_id": device_id,
        "kind": kind,
        "generation": generation,
        "phase": phase,
        "message": message,
        "error_code": error_code,
        "error_message": error_message,
        "at": at if at is not None else now,
        "received_at": now,
    }


def _apply_event(session: Session, event: DeviceEvent, live: bool, targets: Targets | None) -> dict[str, Any]:
    """`ingest_event` but the record: applies the event to its device (from `session`: no `session.add`) and its
    targets; returns the record's values."""
    device = enrolled_device(session=session, device_id=event.device_id)
    if live:
        device.last_seen = utcnow()
    error = event.error
    row = _event_row(
        device_id=event.device_id,
        kind=event.kind.value,
        generation=event.generation,
        phase=event.phase.value if event.phase else None,
        message=event.message,
        error_code=error.code.value if error else None,
        error_message=error.message if error else None,
        at=_instant(event.at),  # in UTC: SQLite keeps a timestamp's wall time and drops its zone
    )
    phase = _event_phase(event)
    if event.kind in (EventKind.UPDATE_FAILED, EventKind.UPDATE_REFUSED) and error is None:
        error = ErrorInfo.of(ErrorCode.INTERNAL, message=event.message or "update failed (no reason given)")
    if error is not None and event.kind in (EventKind.UPDATE_FAILED, EventKind.UPDATE_REFUSED):
        _record_error(device, error)
    if event.generation is not None and phase is not None:
        _advance_targets(
            session, device_id=device.id, generation=event.generation, phase=phase, error=error, targets=targets
        )
    return row


def ingest_batch(*, session: Session, messages: Sequence[tuple[ReportedState | DeviceEvent, bool]]) -> dict[int, str]:
    """Apply reported states and events (each with its `live`) in their order in one transaction, then commit;
    returns why each message of a device not enrolled was ignored, by its index.

    Every device of the batch is loaded with one query and every target they report on with another, and nothing is
    flushed until the commit: a message costs no round trip of its own (a query per message, and the flush that
    query set off, were most of the ingest's time). The commit writes each device row once (its last state wins) and
    inserts the events together, in the order they were added.
    """
    device_ids = sorted({message.device_id for message, _ in messages})
    with session.no_autoflush:
        # Held until the commit: the session's identity map (what `enrolled_device` finds them in) holds them weakly.
        # Not the columns no message touches (the tags, the signed desired state): JSON decoded for nothing.
        unread = [defer(cast("QueryableAttribute[Any]", column)) for column in (Device.tags, Device.desired_state)]
        loaded = session.exec(select(Device).options(*unread).where(col(Device.id).in_(device_ids))).all()
        targets = _batch_targets(session, [message for message, _ in messages])
        unknown: dict[int, str] = {}
        # The events' rows, inserted in order with one statement: an ORM object per event cost more than the rest of
        # its message.
        events: list[dict[str, Any]] = []
        received: list[dict[str, Any]] = []  # of `events`, those the devices sent (the others are the coordinator's)
        for index, (message, live) in enumerate(messages):
            try:
                if isinstance(message, ReportedState):
                    _apply_reported(session, message, live, targets, events)
                else:
                    events.append(row := _apply_event(session, message, live, targets))
                    received.append(row)
            except UnknownDeviceError as exc:  # raised before the message changed anything
                unknown[index] = str(exc)
        if received:
            seen = _stored_events(session, received)
            sent = {id(row) for row in received}
            once = []
            for row in events:
                if id(row) in sent:
                    if (key := _event_key(row)) in seen:
                        continue  # delivered again, in this batch or an earlier one
                    seen.add(key)
                once.append(row)
            events = once
        if events:
            session.execute(insert(DeviceEventRecord), events)
    session.commit()
    del loaded
    return unknown


def confirm_heard_all(*, session: Session, device_ids: Sequence[str]) -> None:
    """`confirm_heard` for several devices in one statement."""
    if device_ids:
        session.exec(
            update(Device)
            .where(col(Device.id).in_(list(device_ids)), col(Device.status) == UNCONFIRMED)
            .values(status=DeviceStatus.ONLINE.value, last_seen=utcnow())
        )
        session.commit()


def _batch_targets(session: Session, messages: Sequence[ReportedState | DeviceEvent]) -> Targets:
    """The deployment targets of every (device, generation) the messages report on, in one query."""
    wanted: Targets = {}
    for message in messages:
        if isinstance(message, ReportedState):
            generation = message.update.generation if message.update is not None else None
        else:
            generation = message.generation
        if generation is not None:
            wanted[(message.device_id, generation)] = []
    if not wanted:
        return wanted
    statement = select(DeploymentTarget).where(
        col(DeploymentTarget.device_id).in_(sorted({device_id for device_id, _ in wanted})),
        col(DeploymentTarget.generation).in_(sorted({generation for _, generation in wanted})),
    )
    for target in session.exec(statement.order_by(col(DeploymentTarget.id))):
        if (key := (target.device_id, target.generation)) in wanted:
            wanted[key].append(target)
    return wanted


def _finish(session: Session, commit: bool) -> None:
    """Commit, unless the caller commits a batch of messages itself."""
    if commit:
        session.commit()


def _event_phase(event: DeviceEvent) -> UpdatePhase | None:
    if event.kind in (EventKind.UPDATE_FAILED, EventKind.UPDATE_REFUSED):  # refused: the signatures did not verify
        return UpdatePhase.FAILED
    if event.kind is EventKind.UPDATE_ACTIVATED:
        return UpdatePhase.ACTIVE
    if event.kind in (EventKind.UPDATE_STARTED, EventKind.UPDATE_PROGRESS):
        return event.phase if event.phase not in (None, UpdatePhase.IDLE) else UpdatePhase.DOWNLOADING
    return None


def _record_error(device: Device, error: ErrorInfo) -> None:
    device.last_error_code = error.code.value
    device.last_error_message = error.message


def _advance_targets(
    session: Session,
    *,
    device_id: str,
    generation: int,
    phase: UpdatePhase,
    error: ErrorInfo | None,
    targets: Targets | None = None,
) -> None:
    """Move the device's targets for `generation` to the status `phase` implies; settled ones stay settled.

    `targets`: a batch's targets, loaded at once (`ingest_batch`); else they are read here."""
    status = target_status_for_phase(phase)
    found = targets.get((device_id, generation)) if targets is not None else None
    if found is None:
        statement = select(DeploymentTarget).where(
            DeploymentTarget.device_id == device_id, DeploymentTarget.generation == generation
        )
        found = list(session.exec(statement))
    for target in found:
        if target.status in (TargetStatus.SUCCEEDED, TargetStatus.SUPERSEDED):
            continue
        if target.status == TargetStatus.FAILED and status is not TargetStatus.SUCCEEDED:
            continue
        if target.status == status.value and target.phase == phase.value and status is not TargetStatus.FAILED:
            continue  # nothing changes (a report repeating its event's phase): no write
        target.status = status.value
        target.phase = phase.value
        if status is TargetStatus.FAILED and error is not None:
            target.error_code = error.code.value
            target.error_message = error.message
        elif status is TargetStatus.SUCCEEDED:
            target.error_code = target.error_message = None
        target.updated_at = utcnow()
        session.add(target)


def device_public(
    device: Device, totals: tuple[int, int, int] = (0, 0, 0), health: tuple[int, TelemetryGapsPublic] | None = None
) -> DevicePublic:
    """The API shape of a device with its telemetry totals, dropped windows and gaps."""
    inferences, errors, windows = totals
    dropped, gaps = health or (0, TelemetryGapsPublic())
    update = {
        "inference_count": inferences,
        "error_count": errors,
        "telemetry_windows": windows,
        "telemetry_dropped": dropped,
        "telemetry_gaps": gaps,
        "model_name": device.active_model_name,
        "model_version": device.active_model_version,
    }
    return DevicePublic.model_validate(device, update=update)


def devices_public(*, session: Session) -> list[DevicePublic]:
    """Every device, by id, with telemetry totals."""
    totals, health = telemetry_totals(session), telemetry_health(session)
    return [
        device_public(d, totals.get(d.id, (0, 0, 0)), health.get(d.id))
        for d in session.exec(select(Device).order_by(Device.id))
    ]


def get_device(*, session: Session, device_id: str) -> DevicePublic:
    """One device with telemetry totals; `NotFoundError` if it is not enrolled."""
    device = require_device(session=session, device_id=device_id)
    totals = telemetry_totals(session, [device_id]).get(device_id, (0, 0, 0))
    return device_public(device, totals, telemetry_health(session, [device_id]).get(device_id))


def device_events(
    *, session: Session, device_id: str, limit: int = 200, after_id: int | None = None
) -> list[DeviceEventPublic]:
    """Events of a device, oldest first: the newest `limit`, or with `after_id` the first `limit` after that id
    (how `devices events --follow` and scripts page forward). `NotFoundError` if the fleet does not know it."""
    require_device(session=session, device_id=device_id)
    statement = select(DeviceEventRecord).where(DeviceEventRecord.device_id == device_id)
    if after_id is not None:
        page = statement.where(col(DeviceEventRecord.id) > after_id).order_by(col(DeviceEventRecord.id)).limit(limit)
        return [DeviceEventPublic.model_validate(e, from_attributes=True) for e in session.exec(page)]
    newest = statement.order_by(col(DeviceEventRecord.id).desc()).limit(limit)
    return [DeviceEventPublic.model_validate(e, from_attributes=True) for e in reversed(list(session.exec(newest)))]


def device_detail(*, session: Session, device_id: str) -> DeviceDetailPublic:
    """One device with telemetry totals and its current certificate (the newest unrevoked one, else the newest)."""
    public = get_device(session=session, device_id=device_id)
    statement = select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)
    certificates = sorted(session.exec(statement), key=lambda c: (c.revoked_at is None, c.id or 0))
    current = certificates[-1] if certificates else None
    certificate = DeviceCertificatePublic.model_validate(current, from_attributes=True) if current else None
    variant = _active_variant(
        session, public.active_model_name, public.active_model_version, public.active_model_sha256
    )
    return DeviceDetailPublic.model_validate(
        public.model_dump() | {"certificate": certificate, "active_variant": variant}
    )


def _active_variant(session: Session, name: str | None, version: str | None, sha256: str | None) -> str | None:
    """Which variant of its active version a device runs, by the digest it reports (None if unknown)."""
    if not (name and version and sha256):
        return None
    record = session.exec(
        select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    ).first()
    if record is None:
        return None
    if record.sha256 == sha256:
        return record.primary_variant
    return next((str(v["name"]) for v in record.variants if v.get("sha256") == sha256), None)
