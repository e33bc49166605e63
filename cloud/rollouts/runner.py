"""The rollout runner: steps every live rollout, persists what the engine decided, then publishes desired states.

One step of one rollout (`RolloutRunner.step_rollout`):

1. read the rollout, its queued commands, and its observations (`rollout_observations.observe`);
2. `step(state, plan, observations, now)` — pure, deterministic;
3. in ONE transaction: the new state, the decisions (numbered), the commands marked applied, and for
   every `Dispatch` / `Rollback` a deployment raising the device's desired generation (once per attempt:
   `RolloutDispatchRecord` is unique per `(rollout, device, kind, attempt)`);
4. after the commit, publish the desired states.

Killed before 3, the next step recomputes the same actions; killed between 3 and 4, `recover()` at start-up
publishes `inflight_actions` again, which finds each attempt's dispatch row and republishes the very same
desired state (same generation) instead of raising a new one. No device is skipped or updated twice.

Replicas of one coordinator (`leases`): a tick steps only the rollouts whose lease (`rollout:<id>`, `cloud.leases`)
this replica holds or takes; taking one over (first tick, or its holder died) starts with `recover()` of that
rollout, so whatever the previous holder committed and may not have published goes out again, same generation.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy import insert
from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from cloud.errors import CloudError
from cloud.leases import Leases
from cloud.models import Deployment, Device, Rollout, RolloutDecisionRecord, RolloutDispatchRecord
from cloud.rollouts import Action, Decision, Dispatch, Rollback, RolloutPlan, Wait, inflight_actions, step
from cloud.rollouts.observations import observe
from cloud.rollouts.service import (
    FINISHED,
    command_applied,
    decision_count,
    load_rollout,
    pending_commands,
)
from cloud.services.deployments import DesiredStatePublisher, assign_devices
from cloud.services.registry import ArtifactLinks, get_model_version
from protocol.messages import DesiredState, utcnow

__all__ = ["RolloutRunner", "execute_actions"]

log = logging.getLogger(__name__)

_STOP_TIMEOUT_S = 10.0
_REST_PER_TICK = 2.0  # seconds of rest per second a tick took (`RolloutRunner.rest_after`)


def _figures(decision: Decision) -> dict[str, object]:
    return decision.model_dump(mode="json", exclude={"at", "message", "kind"})


def execute_actions(
    *, session: Session, rollout_id: int, plan: RolloutPlan, actions: Sequence[Action], links: ArtifactLinks
) -> list[DesiredState]:
    """Turn Dispatch/Rollback actions into desired states, in `session` (not committed); returns them to publish.

    An attempt that already has its dispatch row (a replay after a restart) gets its stored desired state
    back, unchanged, as long as it is still the device's current one; only new attempts raise the generation.
    """
    groups: dict[tuple[str, str], list[Dispatch | Rollback]] = {}
    for action in actions:
        if isinstance(action, Dispatch):
            groups.setdefault(("dispatch", action.version), []).append(action)
        elif isinstance(action, Rollback):
            groups.setdefault(("rollback", action.to_version), []).append(action)
    states: list[DesiredState] = []
    wanted = sorted({action.device_id for group in groups.values() for action in group})
    # One query each for the devices and their dispatch rows, not two per device: a 10,000-device wave is one step.
    devices = {d.id: d for d in session.exec(select(Device).where(col(Device.id).in_(wanted)))} if wanted else {}
    done = _dispatch_rows(session, rollout_id, wanted)
    for (kind, version), group in sorted(groups.items()):
        fresh: list[tuple[Device, int]] = []
        for action in group:
            device = devices.get(action.device_id)
            if device is None:
                log.warning("rollout %s: device %s vanished; action dropped", rollout_id, action.device_id)
                continue
            generation = done.get((action.device_id, kind, action.attempt))
            if generation is None:
                fresh.append((device, action.attempt))
            elif device.desired_state is not None and device.desired_generation == generation:
                states.append(DesiredState.model_validate(device.desired_state))
        if fresh:
            states.extend(_assign(session, rollout_id, plan, kind, version, fresh, links))
    return states


def _dispatch_rows(session: Session, rollout_id: int, device_ids: list[str]) -> dict[tuple[str, str, int], int]:
    """`(device, kind, attempt)` → generation of the dispatch rows of `device_ids` in this rollout."""
    if not device_ids:
        return {}
    statement = select(
        RolloutDispatchRecord.device_id,
        RolloutDispatchRecord.kind,
        RolloutDispatchRecord.attempt,
        RolloutDispatchRecord.generation,
    ).where(RolloutDispatchRecord.rollout_id == rollout_id, col(RolloutDispatchRecord.device_id).in_(device_ids))
    return {(device_id, kind, attempt): generation for device_id, kind, attempt, generation in session.exec(statement)}


def _assign(
    session: Session,
    rollout_id: int,
    plan: RolloutPlan,
    kind: str,
    version: str,
    devices: list[tuple[Device, int]],
    links: ArtifactLinks,
) -> list[DesiredState]:
    """One deployment for the devices of one step sent the same version, through the deployment path."""
    record = get_model_version(session=session, name=plan.model, version=version)
    ids = [device.id for device, _ in devices]
    deployment = Deployment(
        model_name=plan.model,
        model_version=version,
        sha256=record.sha256,
        target={"device_ids": ids, "rollout_id": rollout_id, "kind": kind},
    )
    session.add(deployment)
    session.flush()
    assert deployment.id is not None
    states = assign_devices(
        session=session, deployment=deployment, record=record, devices=[d for d, _ in devices], links=links
    )
    given = {state.device_id: state for state in states}
    rows = []
    now = utcnow()
    for device, attempt in devices:
        state = given.get(device.id)
        if state is None:
            # No variant of the version runs on it: the deployment target says why, and the attempt times out.
            log.warning("rollout %s: %s got no desired state (see deployment %s)", rollout_id, device.id, deployment.id)
            continue
        rows.append(
            {
                "rollout_id": rollout_id,
                "device_id": device.id,
                "kind": kind,
                "attempt": attempt,
                "generation": state.generation,
                "deployment_id": deployment.id,
                "created_at": now,
            }
        )
    if rows:  # one INSERT, not an ORM object a device
        session.execute(insert(RolloutDispatchRecord), rows)
    return states


class RolloutRunner:
    """Steps live rollouts every `tick_s` seconds in a background thread, or when `tick(now)` is called."""

    def __init__(
        self,
        *,
        engine: Engine,
        publisher: DesiredStatePublisher,
        links: Callable[[], ArtifactLinks],
        tick_s: float = 1.0,
        clock: Callable[[], datetime] = utcnow,
        leases: Leases | None = None,
    ) -> None:
        """`leases`: a replica of several steps only the rollouts whose lease it holds (None: every live one)."""
        self._engine = engine
        self._leases = leases
        self._publisher = publisher
        self._links = links
        self.tick_s = tick_s
        self._clock = clock
        self._lock = threading.Lock()  # one step at a time: the thread, and tests or the API calling tick()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # -- lifecycle ------------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the background thread runs."""
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        """Republish in-flight attempts (after a crash), then step rollouts every `tick_s` in a thread (with leases,
        a rollout's recovery comes with taking its lease, in the thread)."""
        if self._leases is None:
            self.recover()
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="edgefleet-rollouts", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread after its current step."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(_STOP_TIMEOUT_S)
            self._thread = None

    def wake(self) -> None:
        """Step soon instead of at the next tick (a rollout was created or a command queued)."""
        self._wake.set()

    def wait_applied(self, command_id: str, timeout: float) -> bool:
        """Wait until the engine has taken command `command_id` in (only meaningful while the thread runs)."""
        deadline = time.monotonic() + timeout
        while True:
            with Session(self._engine) as session:
                if command_applied(session=session, command_id=command_id):
                    return True
            if not self.running or time.monotonic() >= deadline:
                return False
            self.wake()
            time.sleep(0.05)

    def _run(self) -> None:
        while not self._stopping.is_set():
            started = time.monotonic()
            try:
                self.tick()
            except Exception:  # the runner must outlive any single failure; the next tick retries
                log.exception("rollout tick failed")
            self._wake.wait(self.rest_after(time.monotonic() - started))
            self._wake.clear()

    def rest_after(self, took_s: float) -> float:
        """How long to wait after a tick that took `took_s` seconds: `tick_s`, or twice the tick when that is longer.

        A step costs about its rollout's size (the whole state read, compared and written; every device a report
        can still move read): at 10,000 devices ~0.1 s, so a short tick kept the GIL and SQLite's one writer from
        the ingest of the very reports the rollout waits for. Resting twice as long as the tick took bounds the
        runner to a third of the time; a command (`wake`) still steps at once; a replica rests at most a third of
        its leases' time to live, so it renews them long before they expire."""
        rest = max(self.tick_s, _REST_PER_TICK * took_s)
        if self._leases is not None:
            rest = min(rest, max(self.tick_s, self._leases.ttl_s / 3))
        return rest

    # -- stepping -------------------------------------------------------------------------------

    def live_rollouts(self) -> list[int]:
        """Ids of rollouts that may still act: unfinished, or completed and not superseded by a newer one."""
        with Session(self._engine) as session:
            rows = list(session.exec(select(Rollout.id, Rollout.model_name, Rollout.status).order_by(col(Rollout.id))))
        newest = {model: rid for rid, model, _ in rows}
        return [
            rid
            for rid, model, status in rows
            if rid is not None and status not in FINISHED and (status != "completed" or newest[model] == rid)
        ]

    def tick(self, now: datetime | None = None) -> int:
        """Step every live rollout once at `now` (default: the clock); returns how many changed."""
        changed = 0
        for rollout_id in self.live_rollouts():
            try:
                if not self._holds(rollout_id):
                    continue  # another replica steps it
                changed += self.step_rollout(rollout_id, now)
            except (CloudError, SQLAlchemyError, ValueError) as exc:
                # One broken rollout (unreadable state, database hiccup) must not hold the others back.
                log.warning("rollout %s step failed: %s", rollout_id, exc)
        return changed

    def _holds(self, rollout_id: int) -> bool:
        """Whether this replica may step the rollout: no leases, or its lease held (renewed) or taken (recovered)."""
        if self._leases is None:
            return True
        name = f"rollout:{rollout_id}"
        grant = self._leases.acquire(name)
        if grant is not None and grant.fresh:
            try:
                self.recover([rollout_id])  # the previous holder's committed dispatches may never have been published
            except Exception:
                self._leases.release(name)  # taken afresh (and recovered) at a later tick
                raise
        return grant is not None

    def step_rollout(self, rollout_id: int, now: datetime | None = None) -> bool:
        """One engine step of one rollout; persists, then publishes. True if anything changed."""
        now = now or self._clock()
        with self._lock, Session(self._engine, expire_on_commit=False) as session:
            row = session.get(Rollout, rollout_id)
            if row is None:
                return False
            plan, state = load_rollout(row)
            queued = pending_commands(session=session, rollout_id=rollout_id)
            observations = observe(
                session=session, rollout_id=rollout_id, state=state, plan=plan, commands=[c for _, c in queued]
            )
            new_state, actions, decisions = step(state, plan, observations, now)
            if new_state == state and not decisions and not queued:
                return False
            waits = [a.until for a in actions if isinstance(a, Wait)]
            row.state = new_state.model_dump(mode="json")
            row.status = new_state.status.value
            row.next_step_at = min(waits) if waits else None
            row.updated_at = now
            session.add(row)
            seq = decision_count(session=session, rollout_id=rollout_id)
            for offset, decision in enumerate(decisions, start=1):
                session.add(
                    RolloutDecisionRecord(
                        rollout_id=rollout_id,
                        seq=seq + offset,
                        kind=decision.kind,
                        message=decision.message,
                        figures=_figures(decision),
                        at=decision.at,
                    )
                )
                log.info("rollout %s: %s", rollout_id, decision.message)
            for record, _ in queued:
                record.applied_at = now
                session.add(record)
            states = execute_actions(
                session=session, rollout_id=rollout_id, plan=plan, actions=actions, links=self._links()
            )
            session.commit()  # the state, decisions and desired states are stored before anything is published
        self._publish(states)
        return True

    def recover(self, rollout_ids: Sequence[int] | None = None) -> int:
        """Publish again the desired state of every attempt in flight (a crash may have lost the publish) of
        `rollout_ids` (default: every live rollout)."""
        states: list[DesiredState] = []
        with self._lock, Session(self._engine, expire_on_commit=False) as session:
            for rollout_id in self.live_rollouts() if rollout_ids is None else rollout_ids:
                row = session.get(Rollout, rollout_id)
                if row is None:
                    continue
                plan, state = load_rollout(row)
                actions = inflight_actions(state, plan)
                states += execute_actions(
                    session=session, rollout_id=rollout_id, plan=plan, actions=actions, links=self._links()
                )
            session.commit()
        self._publish(states)
        if states:
            log.info("rollouts recovered: republished %d in-flight desired states", len(states))
        return len(states)

    def _publish(self, states: Sequence[DesiredState]) -> None:
        for state in states:
            self._publisher.publish_desired(state)
