"""Leases in the database: which coordinator replica steps a rollout or runs a periodic job, and until when.

Several replicas (`Settings.replicated`) share one PostgreSQL database; a piece of work (`rollout:42`,
`drift-rollups`) is done by the replica holding its lease. A lease is a row of the `lease` table taken or renewed by
one statement, `INSERT ... ON CONFLICT (name) DO UPDATE ... WHERE holder = me OR expires_at < now() RETURNING`:
PostgreSQL locks the row for the upsert, so of two replicas racing for a free lease exactly one gets a row back.

Why a table with an expiry rather than `pg_try_advisory_lock`: an advisory lock lives as long as the connection that
took it. A replica SIGKILLed loses its connections at once, but one whose machine freezes or is cut off keeps its
server backend (and the lock) until TCP keepalives give up, which by default takes hours; a pooled connection would
also have to be pinned for the lock's whole life. A lease row is freed by its expiry whatever the failure, is renewed
by the holder's own tick (every tick is a proof of life), and can be read by an operator (`SELECT * FROM lease`).
Expiry is judged by the database's clock (`now()`), never a replica's, so clock skew between replicas cannot hand
one lease to two of them.

What a lease does not give: fencing. A holder frozen for longer than the lease's time to live (a stop-the-world
pause, a step slower than the TTL) may still finish a step after another replica took over; rollout steps are
guarded by the database's unique constraints (one dispatch per device and attempt, one decision per seq), so the
late one fails at commit rather than dispatching twice.

On SQLite there is one coordinator process and no lease: `leases_for` returns None and callers run as before.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.engine import Engine

__all__ = ["Grant", "Leases", "default_replica_name", "leases_for"]

log = logging.getLogger(__name__)

_ACQUIRE = text(
    """
    INSERT INTO lease (name, holder, acquired_at, renewed_at, expires_at)
    VALUES (:name, :holder, now(), now(), now() + make_interval(secs => :ttl))
    ON CONFLICT (name) DO UPDATE SET
        holder = EXCLUDED.holder,
        acquired_at = CASE WHEN lease.holder = EXCLUDED.holder THEN lease.acquired_at ELSE EXCLUDED.acquired_at END,
        renewed_at = EXCLUDED.renewed_at,
        expires_at = EXCLUDED.expires_at
    WHERE lease.holder = EXCLUDED.holder OR lease.expires_at < now()
    RETURNING acquired_at = renewed_at AS fresh
    """
)
_RELEASE = text("DELETE FROM lease WHERE name = :name AND holder = :holder")
_RELEASE_ALL = text("DELETE FROM lease WHERE holder = :holder")


def default_replica_name() -> str:
    """`<hostname>-<pid>`: unique among the replicas running at one time."""
    return f"{socket.gethostname()}-{os.getpid()}"


@dataclass(frozen=True)
class Grant:
    """A lease held: `fresh` when this call took it (first time, or over from another holder), not renewed it."""

    name: str
    fresh: bool


class Leases:
    """This replica's side of the `lease` table: take or renew a named lease, release it."""

    def __init__(self, engine: Engine, holder: str, ttl_s: float) -> None:
        self.engine = engine
        self.holder = holder
        self.ttl_s = ttl_s

    def acquire(self, name: str, ttl_s: float | None = None) -> Grant | None:
        """Take `name` (free or expired) or renew it (held by this replica) for `ttl_s` (default the leases' TTL);
        None while another replica holds it."""
        with self.engine.begin() as connection:
            row = connection.execute(
                _ACQUIRE, {"name": name, "holder": self.holder, "ttl": float(ttl_s or self.ttl_s)}
            ).first()
        if row is None:
            return None
        if row.fresh:
            log.info("lease taken name=%s holder=%s", name, self.holder)
        return Grant(name, bool(row.fresh))

    def release(self, name: str) -> None:
        """Give `name` up (if this replica holds it): another replica may take it at its next tick."""
        with self.engine.begin() as connection:
            connection.execute(_RELEASE, {"name": name, "holder": self.holder})

    def release_all(self) -> int:
        """Give up every lease this replica holds (a clean stop: the others take over without waiting the TTL)."""
        with self.engine.begin() as connection:
            released = connection.execute(_RELEASE_ALL, {"holder": self.holder}).rowcount
        if released:
            log.info("leases released count=%d holder=%s", released, self.holder)
        return int(released or 0)


def leases_for(engine: Engine, *, replicated: bool, holder: str, ttl_s: float) -> Leases | None:
    """The leases of a replicated coordinator (PostgreSQL); None for a coordinator alone on its database."""
    if not replicated:
        return None
    if engine.dialect.name != "postgresql":
        raise ValueError("leases need PostgreSQL: several coordinator replicas cannot share a SQLite file")
    return Leases(engine, holder, ttl_s)
