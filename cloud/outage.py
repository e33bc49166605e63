"""Waiting out a database outage: which errors are transient, and units of work retried until the database answers.

The MQTT bridge must not acknowledge a message it could not store, nor take the next one first: with a
database that is down, restarting or locked it waits (`PatientDatabase.run`), retrying the same unit of work
with bounded exponential backoff until it succeeds or the bridge stops. The outage is logged once (when it
starts and when it ends) and reported through `on_outage`, for the counters and `/healthz`.

Transient (`is_transient`): the database did not answer — SQLAlchemy's `OperationalError` (down, refused,
shut down, locked, deadlock, serialization failure), `InterfaceError`, `InternalError`, any DBAPI error that
invalidated its connection, `DisconnectionError` and the pool's `TimeoutError`. Not transient: the data or
the code is at fault — `IntegrityError`, `DataError`, `ProgrammingError`, `NotSupportedError`, and anything
that is not a database error; retrying those would fail forever.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from typing import TypeVar

from sqlalchemy.engine import Engine
from sqlalchemy.exc import (
    DataError,
    DBAPIError,
    DisconnectionError,
    IntegrityError,
    NotSupportedError,
    ProgrammingError,
)
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlmodel import Session

from cloud.errors import TransientError

__all__ = ["DatabaseUnavailableError", "PatientDatabase", "backoff_delays", "is_transient"]

log = logging.getLogger(__name__)

T = TypeVar("T")

FIRST_DELAY_S = 0.2
MAX_DELAY_S = 5.0
_CALLER_AT_FAULT = (IntegrityError, DataError, ProgrammingError, NotSupportedError)


class DatabaseUnavailableError(TransientError):
    """The database did not answer before the caller stopped waiting; the work was not done (retry later)."""


def is_transient(exc: BaseException) -> bool:
    """True if `exc` means the database did not answer, so the same work may succeed later. Pure."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    if isinstance(exc, _CALLER_AT_FAULT):
        return False
    return isinstance(exc, DBAPIError | DisconnectionError | PoolTimeoutError)


def backoff_delays(first: float = FIRST_DELAY_S, cap: float = MAX_DELAY_S) -> Iterator[float]:
    """Endless delays doubling from `first` up to `cap` (0.2, 0.4, 0.8, ... 5, 5, ...)."""
    delay = first
    while True:
        yield delay
        delay = min(delay * 2, cap)


class PatientDatabase:
    """Runs units of work in fresh sessions; a transient error is retried with backoff until the database answers."""

    def __init__(
        self,
        engine: Engine,
        *,
        on_outage: Callable[[bool], None] = lambda _down: None,
        first_delay_s: float = FIRST_DELAY_S,
        max_delay_s: float = MAX_DELAY_S,
    ) -> None:
        self._engine = engine
        self._on_outage = on_outage
        self._first = first_delay_s
        self._cap = max_delay_s
        self._stopping = threading.Event()
        self._down_since: float | None = None
        self._retries = 0

    @property
    def down(self) -> bool:
        """True from a transient failure until the next unit of work succeeds."""
        return self._down_since is not None

    def stop(self) -> None:
        """Stop waiting: a unit of work still waiting for the database raises `DatabaseUnavailableError`."""
        self._stopping.set()

    def run(self, work: Callable[[Session], T]) -> T:
        """`work(session)` in a fresh session, retried while the database does not answer.

        Errors that are not transient propagate at once; `DatabaseUnavailableError` if `stop()` came first.
        """
        delays = backoff_delays(self._first, self._cap)
        while True:
            try:
                with Session(self._engine, expire_on_commit=False) as session:
                    result = work(session)
            except Exception as exc:
                if not is_transient(exc):
                    raise
                self._outage(exc)
                if self._stopping.wait(next(delays)):
                    raise DatabaseUnavailableError(f"stopped while the database did not answer: {exc}") from exc
                continue
            self._recovered()
            return result

    def _outage(self, exc: Exception) -> None:
        self._retries += 1
        if self._down_since is not None:
            return
        self._down_since = time.monotonic()
        self._on_outage(True)
        log.warning(
            "database unavailable, holding messages and retrying (backoff %.1f-%.0f s) error=%s: %s",
            self._first,
            self._cap,
            type(exc).__name__,
            str(exc).splitlines()[0] if str(exc) else "",
        )

    def _recovered(self) -> None:
        if self._down_since is None:
            return
        seconds, retries = time.monotonic() - self._down_since, self._retries
        self._down_since, self._retries = None, 0
        self._on_outage(False)
        log.warning("database answers again after %.1f s (%d retries)", seconds, retries)
