"""The federated runner: a thread that moves every unfinished run one step further each tick.

Stateless: everything it needs is in the database and the run's directory, so a restarted coordinator picks
up where the previous one was (a running Flower run is polled again, a building run waits for its candidate
builder if that still lives, else starts it once more).

- pending: build `<data_dir>/federated/runs/<id>/app` (a copy of the Flower App template + trainable.json),
  start the Flower run with the run config (its id is kept in the run directory before it is recorded, so a
  crash in between re-attaches instead of starting a second run) → running;
- running: poll Flower, copy progress.jsonl into `rounds`; `finished:completed` → building, `finished:failed` /
  `finished:stopped` → failed / stopped with Flower's status details; a run Flower does not start within
  `start_timeout_s` → failed;
- building: run `python -m federated.candidate <id>` with a token of its own (revoked once it is done), its output
  in `candidate.log`; it reports through `POST /federated/runs/{id}/candidate`. A builder that exits without
  reporting fails the run with the log's last lines.
"""

from __future__ import annotations

import base64
import hashlib
import importlib.util
import json
import logging
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from sqlalchemy.engine import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlmodel import Session, col, select

from cloud.artifacts import ArtifactStore
from cloud.auth import Role
from cloud.errors import CloudError, NotFoundError
from cloud.federation.flower import FlowerError, FlowerRunStatus
from cloud.federation.runs import (
    RUNNER_ACTOR,
    app_dir,
    finish,
    read_progress,
    read_summary,
    result_dir,
    run_dir,
    transition,
)
from cloud.models import ApiToken, FederatedRun, RunStatus, as_utc
from cloud.periodic import Periodic
from cloud.services.registry import get_model_version
from cloud.services.tokens import create_token, revoke_token
from protocol.messages import utcnow

__all__ = [
    "BUILDER_COMMAND",
    "TOKEN_PREFIX",
    "FederatedRunner",
    "FlowerRuns",
    "default_template",
    "run_config",
]

log = logging.getLogger(__name__)

BUILDER_COMMAND = (sys.executable, "-m", "federated.candidate")
TOKEN_PREFIX = "federated-run-"  # + "<run id>-<attempt>-<random>": the candidate builder's token
_FLOWER_ID_FILE = "flower-run-id"
_PID_FILE = "candidate.pid"
_ATTEMPTS_FILE = "candidate.attempts"
_LOG_FILE = "candidate.log"
_TAIL_LINES = 5
_STOP_GRACE_S = 5.0


class FlowerRuns(Protocol):
    """The part of `cloud.federation.flower.FlowerControl` the runner uses."""

    def start_run(self, app_dir: Path, run_config: Mapping[str, str | int | float | bool]) -> int: ...

    def run_status(self, run_id: int) -> FlowerRunStatus: ...

    def stop_run(self, run_id: int) -> None: ...


def default_template() -> Path | None:
    """The Flower App template shipped in the `federated` package (`federated/flowerapp`), found without importing
    it (cloud never imports federated); None when that package is not installed."""
    spec = importlib.util.find_spec("federated")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "flowerapp"


def run_config(row: FederatedRun, result: Path) -> dict[str, str | int | float | bool]:
    """The Flower run config of a run (the keys the Flower App reads; docs/federated.md). Pure."""
    p = row.params
    return {
        "model": f"{row.model_name}:{row.parent_version}",
        "node-ids": ",".join(row.node_ids),
        "num-server-rounds": int(p["rounds"]),
        "strategy": str(p["strategy"]),
        "proximal-mu": float(p.get("proximal_mu") or 0.0),
        "local-epochs": int(p["local_epochs"]),
        "lr": float(p["lr"]),
        "batch-size": int(p["batch_size"]),
        "min-nodes": int(p["min_nodes"]),
        "round-timeout": float(p["round_timeout_s"]),
        "dp-noise": float(p.get("dp_noise") or 0.0),
        "dp-clip": float(p.get("dp_clip") or 0.0),
        "secagg": bool(p.get("secagg", False)),
        "min-samples": int(p["min_samples"]),
        "eval-fraction": float(p.get("eval_fraction", 0.2)),
        "result-dir": str(result),
    }


def _tail(path: Path, lines: int = _TAIL_LINES) -> str:
    """The last `lines` non-empty lines of a log, joined with ' | ' (empty when there is none)."""
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return ""
    return " | ".join([line.strip() for line in text.splitlines() if line.strip()][-lines:])[-2000:]


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int, marker: str, run_id: int) -> bool:
    """Whether `pid` is still the candidate builder of `run_id` (its command line holds `marker` and ends with the
    run id): a builder started before a restart, no longer our child."""
    raw = b""
    for _ in range(20):
        try:
            raw = Path(f"/proc/{pid}/cmdline").read_bytes()
            state = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0]
        except (OSError, IndexError):
            return False
        if state in ("Z", "X"):  # ended, not reaped yet
            return False
        if raw:
            break
        time.sleep(0.01)  # a process in the middle of its exec shows no command line for a moment
    args = raw.rstrip(b"\0").split(b"\0")
    return args[-1] == str(run_id).encode() and marker.encode() in b" ".join(args)


@dataclass
class _Builder:
    """A candidate builder this runner started (`process`), or found alive after a restart (`process` None)."""

    pid: int
    process: subprocess.Popen[bytes] | None = None
    alive: Callable[[], bool] = lambda: False

    def exit_code(self) -> int | None:
        """None while it runs; its exit code (-1: unknown, not our child) once it has ended."""
        if self.process is not None:
            return self.process.poll()
        return None if self.alive() else -1

    def terminate(self) -> None:
        """End it: SIGTERM, then SIGKILL after a grace period."""
        if self.process is None:
            return  # not our child: it reports to a run that has ended and is refused
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


class FederatedRunner:
    """Steps every unfinished federated run each `tick_s` seconds in a thread, or when `tick()` is called."""

    def __init__(
        self,
        *,
        engine: Engine,
        store: ArtifactStore,
        data_dir: Path,
        flower: Callable[[], FlowerRuns | None],
        api_url: Callable[[], str],
        template: Path | None = None,
        tick_s: float = 1.0,
        start_timeout_s: float = 300.0,
        builder_command: Sequence[str] = BUILDER_COMMAND,
        max_build_attempts: int = 2,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.store = store
        self.data_dir = data_dir
        self.flower = flower
        self.api_url = api_url
        self.template = template
        self.start_timeout_s = start_timeout_s
        self.builder_command = tuple(builder_command)
        self.max_build_attempts = max_build_attempts
        self.clock = clock
        self._builders: dict[int, _Builder] = {}
        self._errors: dict[int, str] = {}
        self._periodic = Periodic("federated-runner", self.tick, tick_s)

    def start(self) -> None:
        """Start the thread."""
        self._periodic.start()

    def stop(self) -> None:
        """Stop the thread, and the candidate builders it started (a restart starts them again)."""
        self._periodic.stop()
        for builder in self._builders.values():
            builder.terminate()
        self._builders.clear()

    # -- one tick ----------------------------------------------------------------------------------

    def tick(self) -> None:
        """One step of every unfinished run, then the builders and tokens of finished runs cleaned up."""
        with Session(self.engine) as session:
            unfinished = [RunStatus.PENDING.value, RunStatus.RUNNING.value, RunStatus.BUILDING.value]
            ids = list(session.exec(select(FederatedRun.id).where(col(FederatedRun.status).in_(unfinished))))
        for run_id in sorted(i for i in ids if i is not None):
            try:
                self.step(run_id)
                self._errors.pop(run_id, None)
            except (FlowerError, CloudError, SQLAlchemyError, OSError) as exc:  # try again next tick
                message = f"{type(exc).__name__}: {exc}"
                if self._errors.get(run_id) != message:
                    log.warning("federated run %s: step failed, retrying: %s", run_id, message)
                self._errors[run_id] = message
        self._clean_up()

    def step(self, run_id: int) -> None:
        """Move run `run_id` one step (see the module docstring)."""
        with Session(self.engine, expire_on_commit=False) as session:
            row = session.get(FederatedRun, run_id)
            if row is None:
                return
            status = RunStatus(row.status)
            if status is RunStatus.PENDING:
                self._start(session, row)
            elif status is RunStatus.RUNNING:
                self._poll(session, row)
            elif status is RunStatus.BUILDING:
                self._build(session, row)

    # -- pending → running -------------------------------------------------------------------------

    def _start(self, session: Session, row: FederatedRun) -> None:
        flower = self.flower()
        if flower is None:
            return  # federated learning is off on this start of the coordinator: the run waits for it
        assert row.id is not None
        try:
            app = self._build_app(session, row)
        except _AppError as exc:
            finish(session, row.id, RunStatus.PENDING, RunStatus.FAILED, error=str(exc))
            return
        id_file = run_dir(self.data_dir, row.id) / _FLOWER_ID_FILE
        flower_id = _read_int(id_file)
        if flower_id is None:
            try:
                flower_id = flower.start_run(app, run_config(row, result_dir(self.data_dir, row.id).resolve()))
            except FlowerError as exc:
                finish(
                    session, row.id, RunStatus.PENDING, RunStatus.FAILED, error=f"Flower did not start the run: {exc}"
                )
                return
            id_file.write_text(f"{flower_id}\n")
        if transition(session, row.id, RunStatus.PENDING, status=RunStatus.RUNNING.value, flower_run_id=str(flower_id)):
            session.commit()
            log.info("federated run %s running as Flower run %s", row.id, flower_id)
            return
        session.rollback()
        log.info("federated run %s was stopped while it started; stopping Flower run %s", row.id, flower_id)
        try:
            flower.stop_run(flower_id)
        except FlowerError as exc:
            log.warning("federated run %s: Flower run %s not stopped: %s", row.id, flower_id, exc)

    def _build_app(self, session: Session, row: FederatedRun) -> Path:
        """The run's Flower App directory: the template copied, with the parent's trainable form in trainable.json."""
        assert row.id is not None
        target = app_dir(self.data_dir, row.id)
        result_dir(self.data_dir, row.id).mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            return target  # built (whole: it is moved into place in one rename)
        template = self.template or default_template()
        if template is None or not (template / "pyproject.toml").is_file():
            raise _AppError(
                f"the Flower App template is missing ({template or 'the federated package is not installed'}): "
                "install edgefleet with its federated package, or set federated_app_dir"
            )
        parent = f"{row.model_name}:{row.parent_version}"
        try:
            record = get_model_version(session=session, name=row.model_name, version=row.parent_version)
            trainable = dict(record.trainable or {})
            if not trainable:
                raise _AppError(f"version {parent} has no trainable form any more")
            program = self.store.path(str(trainable["sha256"])).read_bytes()
        except NotFoundError as exc:  # deleted since the run was created
            raise _AppError(f"the trainable form of {parent} is gone: {exc}") from exc
        if hashlib.sha256(program).hexdigest() != trainable["sha256"]:
            raise _AppError(f"the stored trainable form of {parent} is damaged (its sha256 differs)")
        scratch = target.with_name(".app.tmp")
        shutil.rmtree(scratch, ignore_errors=True)
        shutil.copytree(template, scratch, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".*"))
        body = {
            "format": trainable.get("format", "torch.export"),
            "sha256": trainable["sha256"],
            "program_b64": base64.b64encode(program).decode("ascii"),
        }
        (scratch / "trainable.json").write_text(json.dumps(body))
        os.rename(scratch, target)
        return target

    # -- running → building | failed | stopped -----------------------------------------------------

    def _poll(self, session: Session, row: FederatedRun) -> None:
        flower = self.flower()
        if flower is None or row.flower_run_id is None:
            return
        assert row.id is not None
        flower_id = int(row.flower_run_id)
        reported = flower.run_status(flower_id)
        rounds = read_progress(result_dir(self.data_dir, row.id))
        state, details = reported.status, reported.details
        if state == "finished:completed":
            summary = read_summary(result_dir(self.data_dir, row.id))
            if transition(session, row.id, RunStatus.RUNNING, status=RunStatus.BUILDING.value, rounds=rounds,
                          summary=summary):  # fmt: skip
                session.commit()
                log.info("federated run %s: Flower run %s completed; building the candidate", row.id, flower_id)
                self._spawn(session, row.id)
            return
        if state == "finished:failed":
            error = f"Flower run {flower_id} failed: {details or 'no details given'}"
            finish(session, row.id, RunStatus.RUNNING, RunStatus.FAILED, error=error, rounds=rounds)
            return
        if state == "finished:stopped":
            error = f"Flower run {flower_id} was stopped" + (f": {details}" if details else "")
            finish(session, row.id, RunStatus.RUNNING, RunStatus.STOPPED, error=error, rounds=rounds)
            return
        if state in ("pending", "starting") and not rounds:
            since = as_utc(row.updated_at) or utcnow()
            waited = self.clock() - since.timestamp()
            if waited > self.start_timeout_s:
                self._give_up(session, row, flower, state, details, waited)
            return
        if rounds != row.rounds and transition(session, row.id, RunStatus.RUNNING, rounds=rounds):
            session.commit()

    def _give_up(
        self, session: Session, row: FederatedRun, flower: FlowerRuns, state: str, details: str, waited: float
    ) -> None:
        assert row.id is not None and row.flower_run_id is not None
        try:
            flower.stop_run(int(row.flower_run_id))
        except FlowerError as exc:
            log.warning("federated run %s: Flower run %s not stopped: %s", row.id, row.flower_run_id, exc)
        error = (
            f"Flower run {row.flower_run_id} did not start within {waited:.0f} s (still {state}"
            + (f": {details}" if details else "")
            + "); is the SuperLink's executor running? See the coordinator's log"
        )
        finish(session, row.id, RunStatus.RUNNING, RunStatus.FAILED, error=error)

    # -- building → completed | failed (the builder reports; the runner watches it) --------------------

    def _build(self, session: Session, row: FederatedRun) -> None:
        assert row.id is not None
        directory = run_dir(self.data_dir, row.id)
        builder = self._builders.get(row.id)
        if builder is None:
            pid = _read_int(directory / _PID_FILE)
            marker, run_id = self.builder_command[-1], row.id
            if pid is not None and _alive(pid, marker, run_id):  # a builder from before a restart: await its report
                self._builders[row.id] = _Builder(pid, alive=lambda: _alive(pid, marker, run_id))
                return
            self._spawn(session, row.id)
            return
        code = builder.exit_code()
        if code is None:
            return
        del self._builders[row.id]
        session.expire_all()
        if code == -1:  # not our child: its exit code is unknown; the next tick starts it again or gives up
            return
        tail = _tail(directory / _LOG_FILE)
        if code == 0:
            error = "the candidate builder exited without reporting a candidate"
        else:
            error = f"the candidate builder exited with status {code}"
        finish(session, row.id, RunStatus.BUILDING, RunStatus.FAILED, error=error + (f": {tail}" if tail else ""))

    def _spawn(self, session: Session, run_id: int) -> None:
        """Start the candidate builder of `run_id` with a token of its own (or fail the run after too many tries)."""
        directory = run_dir(self.data_dir, run_id)
        directory.mkdir(parents=True, exist_ok=True)
        attempts = (_read_int(directory / _ATTEMPTS_FILE) or 0) + 1
        if attempts > self.max_build_attempts:
            tail = _tail(directory / _LOG_FILE)
            error = f"the candidate builder ended {attempts - 1} times without reporting"
            error += f": {tail}" if tail else ""
            finish(session, run_id, RunStatus.BUILDING, RunStatus.FAILED, error=error)
            return
        (directory / _ATTEMPTS_FILE).write_text(f"{attempts}\n")
        # One token per builder: it pushes the candidate (publisher), may start a rollout (operator) and reports
        # (operator); a token has one role, so it is an admin token, revoked as soon as the builder is done.
        name = f"{TOKEN_PREFIX}{run_id}-{attempts}-{secrets.token_hex(3)}"
        token, _ = create_token(session=session, name=name, role=Role.ADMIN, created_by=RUNNER_ACTOR)
        env = dict(os.environ)
        env.update(
            EDGEFLEET_URL=self.api_url(),
            EDGEFLEET_TOKEN=token,
            EDGEFLEET_CONFIG=str(directory / "no-cli-config.toml"),  # never the operator's CLI config
        )
        with (directory / _LOG_FILE).open("ab") as out:
            out.write(f"--- candidate builder, attempt {attempts}, {utcnow().isoformat()} ---\n".encode())
            out.flush()
            process = subprocess.Popen(
                [*self.builder_command, str(run_id)], stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=directory,
            )  # fmt: skip
        (directory / _PID_FILE).write_text(f"{process.pid}\n")
        self._builders[run_id] = _Builder(process.pid, process)
        log.info("federated run %s: candidate builder started pid=%s attempt=%d", run_id, process.pid, attempts)

    # -- clean-up ----------------------------------------------------------------------------------

    def _clean_up(self) -> None:
        """End the builders of runs that ended meanwhile (stopped while building), and revoke every builder token
        whose builder is gone."""
        with Session(self.engine) as session:
            if self._builders:
                ended = session.exec(
                    select(FederatedRun.id).where(
                        col(FederatedRun.id).in_(list(self._builders)),
                        col(FederatedRun.status) != RunStatus.BUILDING.value,
                    )
                )
                for run_id in list(ended):
                    if run_id is not None:
                        self._builders.pop(run_id).terminate()
            tokens = select(ApiToken).where(
                col(ApiToken.name).startswith(TOKEN_PREFIX), col(ApiToken.revoked_at).is_(None)
            )
            for token in list(session.exec(tokens)):
                if _token_run(token.name) not in self._builders:
                    revoke_token(session=session, name=token.name, actor=RUNNER_ACTOR)


def _token_run(name: str) -> int | None:
    """The run id in a builder token's name (`federated-run-<id>-<attempt>-<random>`)."""
    head = name.removeprefix(TOKEN_PREFIX).split("-", 1)[0]
    return int(head) if head.isdigit() else None


class _AppError(Exception):
    """The run's Flower App cannot be built: the run fails with this message."""
