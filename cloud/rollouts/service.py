"""Rollouts as the API sees them: create one from a plan, queue operator commands, show progress and decisions.

The decisions themselves are taken by the pure engine (`cloud.rollouts`) inside `RolloutRunner`
(`cloud.rollouts.runner`); this module only stores plans and commands and reads what the runner
persisted. A command is checked against the rollout's current state (`command_error`, 409 when it does
not apply), stored, and handed to the engine at its next step, so it is never lost to a restart.
"""

from __future__ import annotations

import heapq
import threading
import uuid
from collections import Counter, OrderedDict
from typing import Any
from typing import cast as cast_type

from pydantic import TypeAdapter
from sqlalchemy import String, cast
from sqlalchemy.orm import QueryableAttribute, defer
from sqlmodel import Session, col, func, select

from cloud import audit
from cloud.errors import ConfigurationError, ConflictError, EmptyTargetError, NotFoundError
from cloud.models import (
    Rollout,
    RolloutCommandRecord,
    RolloutDecisionPublic,
    RolloutDecisionRecord,
    RolloutDetailPublic,
    RolloutDevicePublic,
    RolloutPublic,
    RolloutWavePublic,
    as_utc,
)
from cloud.rollouts import Command, RolloutPlan, RolloutState, RolloutStatus, command_error, gate_report
from cloud.rollouts.observations import fleet_tags, observe
from cloud.rollouts.state import FORMAT_VERSION
from cloud.services.registry import get_model_version

__all__ = [
    "FINISHED",
    "UNFINISHED",
    "command_applied",
    "create_rollout",
    "decision_count",
    "engine_id",
    "get_rollout",
    "list_rollouts",
    "load_rollout",
    "new_command_id",
    "pending_commands",
    "queue_command",
    "rollout_public",
]

# A rollout in one of these no longer changes; `completed` still serves late joiners, so it is not here.
FINISHED = frozenset({RolloutStatus.ABORTED.value, RolloutStatus.ROLLED_BACK.value})
# Statuses that hold the model: a second rollout of it is refused until these are over.
UNFINISHED = frozenset(
    s.value
    for s in (
        RolloutStatus.PENDING,
        RolloutStatus.RUNNING,
        RolloutStatus.BAKING,
        RolloutStatus.PAUSED,
        RolloutStatus.ROLLING_BACK,
    )
)
_COMMAND = TypeAdapter[Command](Command)
# The audit log's action of each operator command.
_COMMAND_ACTIONS = {
    "pause": "rollout.paused",
    "resume": "rollout.resumed",
    "abort": "rollout.aborted",
    "promote": "rollout.promoted",
}


def engine_id(rollout_id: int) -> str:
    """The engine's id of rollout `rollout_id` (it seeds the stable device draws)."""
    return f"rollout-{rollout_id}"


def new_command_id() -> str:
    """A fresh, unique command id."""
    return uuid.uuid4().hex


def load_rollout(row: Rollout) -> tuple[RolloutPlan, RolloutState]:
    """The plan and engine state stored in `row`; a state of another format version is refused."""
    if row.format_version != FORMAT_VERSION:
        raise ConfigurationError(
            f"rollout {row.id} has state format {row.format_version}, this coordinator reads {FORMAT_VERSION}"
        )
    return RolloutPlan.model_validate(row.plan), RolloutState.model_validate(row.state)


def _get(session: Session, rollout_id: int) -> Rollout:
    row = session.get(Rollout, rollout_id)
    if row is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist")
    return row


def create_rollout(*, session: Session, plan: RolloutPlan, actor: str) -> Rollout:
    """Store a new rollout of `plan` (pending: the runner starts it at its next step), audited as `actor`.

    Unknown model/version → `NotFoundError`; another unfinished rollout of the model → `ConflictError`;
    a selector matching no enrolled device → `EmptyTargetError`.
    """
    get_model_version(session=session, name=plan.model, version=plan.version)
    if plan.previous_version is not None:
        get_model_version(session=session, name=plan.model, version=plan.previous_version)
    busy = session.exec(
        select(Rollout.id).where(Rollout.model_name == plan.model, col(Rollout.status).in_(sorted(UNFINISHED)))
    ).first()
    if busy is not None:
        raise ConflictError(
            f"rollout {busy} of {plan.model} is not finished yet: abort it or let it finish before starting another"
        )
    row = Rollout(model_name=plan.model, model_version=plan.version, plan=plan.model_dump(mode="json"))
    session.add(row)
    session.flush()
    assert row.id is not None
    if not plan.selector.select(engine_id(row.id), fleet_tags(session=session)):
        session.rollback()
        raise EmptyTargetError(
            "the selector matches no enrolled device (devices enrol when they first connect)", field="selector"
        )
    row.state = RolloutState.new(engine_id(row.id)).model_dump(mode="json")
    row.format_version = FORMAT_VERSION
    session.add(row)
    details = {"model": plan.model, "version": plan.version, "previous_version": plan.previous_version}
    audit.record(session=session, actor=actor, action="rollout.created", subject=str(row.id), details=details)
    session.commit()
    session.refresh(row)
    return row


def queue_command(*, session: Session, rollout_id: int, command: Command, actor: str) -> RolloutCommandRecord:
    """Store `command` for the engine's next step, audited as `actor`; `ConflictError` if it cannot apply."""
    row = _get(session, rollout_id)
    plan, state = load_rollout(row)
    if why := command_error(state, plan, command):
        raise ConflictError(f"rollout {rollout_id}: {why}")
    record = RolloutCommandRecord(
        rollout_id=rollout_id,
        command_id=command.command_id,
        kind=command.kind,
        body=command.model_dump(mode="json"),
    )
    session.add(record)
    audit.record(
        session=session,
        actor=actor,
        action=_COMMAND_ACTIONS[command.kind],
        subject=str(rollout_id),
        details=command.model_dump(mode="json", exclude={"kind", "by"}),
    )
    session.commit()
    session.refresh(record)
    return record


def pending_commands(*, session: Session, rollout_id: int) -> list[tuple[RolloutCommandRecord, Command]]:
    """Commands of the rollout not applied yet, oldest first."""
    statement = (
        select(RolloutCommandRecord)
        .where(RolloutCommandRecord.rollout_id == rollout_id, col(RolloutCommandRecord.applied_at).is_(None))
        .order_by(col(RolloutCommandRecord.id))
    )
    return [(r, _COMMAND.validate_python(r.body)) for r in session.exec(statement)]


def command_applied(*, session: Session, command_id: str) -> bool:
    """Whether the engine has taken the command in."""
    statement = select(RolloutCommandRecord.applied_at).where(RolloutCommandRecord.command_id == command_id)
    return session.exec(statement).first() is not None


def rollout_public(row: Rollout, loaded: tuple[RolloutPlan, RolloutState] | None = None) -> RolloutPublic:
    """The listing shape of a rollout (`loaded`: its plan and state, read from `row` already)."""
    plan, state = loaded or load_rollout(row)
    counts = Counter(record.phase.value for record in state.devices.values())
    return RolloutPublic.model_validate(
        row,
        update={
            "previous_version": plan.previous_version,
            "baseline": plan.baseline,
            "current_wave": state.current_wave,
            "current_wave_number": state.current_wave + 1,
            "wave_count": len(plan.waves),
            "device_count": len(state.devices),
            "counts": dict(sorted(counts.items())),
            "reason": state.reason,
            "waiting": state.waiting,
        },
    )


def list_rollouts(*, session: Session, limit: int = 100) -> list[RolloutPublic]:
    """The newest rollouts first."""
    rows = session.exec(select(Rollout).order_by(col(Rollout.id).desc()).limit(limit))
    return [rollout_public(row) for row in rows]


def _waves(plan: RolloutPlan, state: RolloutState) -> list[RolloutWavePublic]:
    waves = []
    for index, wave in enumerate(plan.waves):
        members = [r for r in state.devices.values() if r.wave == index]
        if state.status is RolloutStatus.COMPLETED or index < state.current_wave:
            where = "done"
        else:
            where = "current" if index == state.current_wave else "waiting"
        waves.append(
            RolloutWavePublic(
                index=index,
                number=index + 1,
                size=wave.describe(),
                bake_seconds=wave.bake_seconds,
                devices=len(members),
                counts=dict(sorted(Counter(r.phase.value for r in members).items())),
                state=where,
            )
        )
    return waves


def _live_gates(session: Session, row: Rollout, plan: RolloutPlan, state: RolloutState) -> dict[str, Any] | None:
    """The current wave's gates on the telemetry so far (while a wave runs or bakes), else the last verdict."""
    assert row.id is not None
    if state.status in {RolloutStatus.RUNNING, RolloutStatus.BAKING}:
        # The gates read the cohorts' telemetry, not the device reports: those were half of a status poll.
        observations = observe(
            session=session, rollout_id=row.id, state=state, plan=plan, with_fleet=False, with_reports=False
        )
        report = gate_report(state, plan, observations)
        wave = state.current_wave
        return {"wave": wave, "wave_number": wave + 1, "live": True, **report.model_dump(mode="json")}
    statement = (
        select(RolloutDecisionRecord)
        .where(
            RolloutDecisionRecord.rollout_id == row.id,
            col(RolloutDecisionRecord.kind).in_(["gate_passed", "gate_failed", "gate_inconclusive"]),
        )
        .order_by(col(RolloutDecisionRecord.seq).desc())
    )
    last = session.exec(statement).first()
    if last is None:
        return None
    return {"live": False, **_numbered({"wave": last.figures.get("wave")}), **dict(last.figures.get("report") or {})}


def _numbered(figures: dict[str, Any]) -> dict[str, Any]:
    """A decision's figures with the 1-based `wave_number` (and `to_wave_number`) beside each 0-based index."""
    extra = {f"{key}_number": figures[key] + 1 for key in ("wave", "to_wave") if isinstance(figures.get(key), int)}
    return figures | extra


def get_rollout(
    *, session: Session, rollout_id: int, decisions: int = 200, devices: int | None = None
) -> RolloutDetailPublic:
    """One rollout with per-wave progress, gate figures, its latest `decisions` and per-device states: the first
    `devices` by device id (None: every device; 0: none, for a status poll: `device_count` and `counts` say how many
    and in which phase, and 10,000 device rows cost a poll more than the rest of it)."""
    # The row without its state, and the state as the text it is stored as (decoded once per content): one query.
    unread = defer(cast_type("QueryableAttribute[Any]", Rollout.state))
    lookup = select(Rollout, cast(col(Rollout.state), String)).options(unread).where(Rollout.id == rollout_id)
    found = session.exec(lookup).first()
    if found is None:
        raise NotFoundError(f"rollout {rollout_id} does not exist")
    row, text = found
    plan, state = _shown(row, text)
    statement = (
        select(RolloutDecisionRecord)
        .where(RolloutDecisionRecord.rollout_id == rollout_id)
        .order_by(col(RolloutDecisionRecord.seq).desc())
        .limit(decisions)
    )
    log = [
        RolloutDecisionPublic.model_validate(d, update={"figures": _numbered(d.figures)})
        for d in reversed(list(session.exec(statement)))
    ]
    return RolloutDetailPublic.model_validate(
        rollout_public(row, (plan, state)),
        update={
            "plan": row.plan,
            "waves": _waves(plan, state),
            "devices": _device_rows(state, devices),
            "gates": _live_gates(session, row, plan, state),
            "decisions": log,
        },
    )


class _ShownStates:
    """The engine states the status views decoded last, keyed by their stored JSON text: a status poll of a rollout
    that has not moved since the last one reads the text (one column) and skips decoding it (a 10,000-device state
    is ~1.5 MB of JSON and ~10,000 validated records: most of a poll's time). The key is the content itself, so a
    state changed by any writer, replica or clock is never served stale. Read-only: what is handed out here must
    never be changed (the engine steps a copy of the state it loads itself, `load_rollout`)."""

    def __init__(self, size: int = 4) -> None:
        self._lock = threading.Lock()
        self._size = size
        self._states: OrderedDict[str, RolloutState] = OrderedDict()

    def get(self, text: str) -> RolloutState:
        with self._lock:
            state = self._states.get(text)
            if state is not None:
                self._states.move_to_end(text)
                return state
        state = RolloutState.model_validate_json(text)
        with self._lock:
            self._states[text] = state
            while len(self._states) > self._size:
                self._states.popitem(last=False)
        return state


_SHOWN_STATES = _ShownStates()


def _shown(row: Rollout, text: str) -> tuple[RolloutPlan, RolloutState]:
    """`load_rollout` for the status views (`text`: the row's state as stored): the same refusals, the state decoded
    at most once per content."""
    if row.format_version != FORMAT_VERSION:
        return load_rollout(row)  # refused there, with the reason
    return RolloutPlan.model_validate(row.plan), _SHOWN_STATES.get(text)


def _device_rows(state: RolloutState, limit: int | None) -> list[RolloutDevicePublic]:
    """The first `limit` devices of `state` by id (None: all). Built without validation: every value comes from the
    validated state (`model_construct` takes ~1 µs a row, validating ~8)."""
    ids = sorted(state.devices) if limit is None else heapq.nsmallest(limit, state.devices)
    rows = []
    for device_id in ids:
        record = state.devices[device_id]
        rows.append(
            RolloutDevicePublic.model_construct(
                device_id=device_id,
                wave=record.wave,
                wave_number=record.wave + 1,
                phase=record.phase.value,
                attempts=record.attempts,
                rollback_attempts=record.rollback_attempts,
                late_joiner=record.late_joiner,
                last_error=record.last_error,
                next_retry_at=as_utc(record.next_retry_at),  # what `UtcOut` validation would do
            )
        )
    return rows


def decision_count(*, session: Session, rollout_id: int) -> int:
    """How many decisions the rollout recorded (the next one gets this + 1)."""
    statement = select(func.coalesce(func.max(RolloutDecisionRecord.seq), 0)).where(
        RolloutDecisionRecord.rollout_id == rollout_id
    )
    return int(session.exec(statement).one())
