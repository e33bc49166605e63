"""What the embedded broker must not forget, in a SQLite file: persistent sessions, messages owed, retained messages.

Five tables, each a promise the broker made to a client:

- `sessions`: client ids that connected with `clean_session=False`, with the identity they authenticated as;
- `subscriptions`: their topic filters and granted QoS;
- `inbox`: QoS 1 messages the broker acknowledged (PUBACK) but has not yet routed to subscribers. A row is
  committed *before* the PUBACK goes out and removed in the transaction that routes the message;
- `queued`: messages routed to a persistent session and not yet acknowledged by its client; a row goes
  when the client's PUBACK arrives;
- `retained`: the last retained message of each topic.

Writes are committed at once (WAL, `synchronous=NORMAL`): they survive the broker's process being killed,
but the last transactions may be lost if the whole machine loses power. Pure IO, no amqtt: the broker's
hooks are in `cloud.broker_durable`. Only the broker's own thread uses a store.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cloud.errors import BrokerStartError

__all__ = ["STORE_FILE", "BrokerStore", "InboxMessage", "QueuedMessage", "StoredSession", "StoredState"]

STORE_FILE = "broker.sqlite3"
_FORMAT = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (client_id TEXT PRIMARY KEY, owner TEXT);
CREATE TABLE IF NOT EXISTS subscriptions (
    client_id TEXT NOT NULL, topic_filter TEXT NOT NULL, qos INTEGER NOT NULL, PRIMARY KEY (client_id, topic_filter)
);
CREATE TABLE IF NOT EXISTS inbox (
    id INTEGER PRIMARY KEY AUTOINCREMENT, topic TEXT NOT NULL, payload BLOB NOT NULL, qos INTEGER NOT NULL,
    retain INTEGER NOT NULL, owner TEXT
);
CREATE TABLE IF NOT EXISTS queued (
    id INTEGER PRIMARY KEY AUTOINCREMENT, client_id TEXT NOT NULL, topic TEXT NOT NULL, payload BLOB NOT NULL,
    qos INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS queued_by_client ON queued (client_id, id);
CREATE TABLE IF NOT EXISTS retained (topic TEXT PRIMARY KEY, payload BLOB NOT NULL, qos INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class QueuedMessage:
    """A message owed to a persistent session."""

    id: int
    topic: str
    payload: bytes
    qos: int


@dataclass(frozen=True)
class InboxMessage:
    """A message the broker acknowledged to its publisher but had not routed yet."""

    id: int
    topic: str
    payload: bytes
    qos: int
    retain: bool
    owner: str | None


@dataclass(frozen=True)
class StoredSession:
    """A persistent session: who owns it, what it subscribed to, what it is owed (oldest first)."""

    client_id: str
    owner: str | None
    subscriptions: tuple[tuple[str, int], ...] = ()
    queued: tuple[QueuedMessage, ...] = ()


@dataclass(frozen=True)
class StoredState:
    """Everything a restarted broker restores."""

    sessions: tuple[StoredSession, ...] = ()
    retained: tuple[tuple[str, bytes, int], ...] = ()
    inbox: tuple[InboxMessage, ...] = ()


class BrokerStore:
    """The SQLite file at `path` (created on first use); `BrokerStartError` if it cannot be opened or is too new."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._db = sqlite3.connect(path, isolation_level=None)  # autocommit; transactions are explicit
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
            if version > _FORMAT:
                raise BrokerStartError(
                    f"{path} was written by a newer edgefleet (format {version}, this one reads {_FORMAT}); "
                    "run that release, or delete the file (the broker then forgets its sessions and queued messages)"
                )
            self._db.executescript(_SCHEMA)
            self._db.execute(f"PRAGMA user_version = {_FORMAT}")
        except sqlite3.Error as exc:
            raise BrokerStartError(f"cannot open the broker's state file {path}: {exc}") from exc

    def close(self) -> None:
        """Close the file; safe to call twice."""
        self._db.close()

    # -- reading, once at start ---------------------------------------------------------------------

    def load(self) -> StoredState:
        """Every persistent session with its subscriptions and queue, the retained messages and the inbox."""
        subscriptions: dict[str, list[tuple[str, int]]] = {}
        for client_id, topic_filter, qos in self._db.execute(
            "SELECT client_id, topic_filter, qos FROM subscriptions ORDER BY client_id, topic_filter"
        ):
            subscriptions.setdefault(client_id, []).append((topic_filter, qos))
        queued: dict[str, list[QueuedMessage]] = {}
        for row_id, client_id, topic, payload, qos in self._db.execute(
            "SELECT id, client_id, topic, payload, qos FROM queued ORDER BY id"
        ):
            queued.setdefault(client_id, []).append(QueuedMessage(row_id, topic, bytes(payload), qos))
        sessions = tuple(
            StoredSession(client_id, owner, tuple(subscriptions.get(client_id, ())), tuple(queued.get(client_id, ())))
            for client_id, owner in self._db.execute("SELECT client_id, owner FROM sessions ORDER BY client_id")
        )
        retained = tuple(
            (topic, bytes(payload), qos)
            for topic, payload, qos in self._db.execute("SELECT topic, payload, qos FROM retained ORDER BY topic")
        )
        inbox = tuple(
            InboxMessage(row_id, topic, bytes(payload), qos, bool(retain), owner)
            for row_id, topic, payload, qos, retain, owner in self._db.execute(
                "SELECT id, topic, payload, qos, retain, owner FROM inbox ORDER BY id"
            )
        )
        return StoredState(sessions, retained, inbox)

    # -- sessions and subscriptions -------------------------------------------------------------

    def keep_session(self, client_id: str, owner: str | None) -> None:
        """Record a persistent session (again), owned by `owner`."""
        self._db.execute("INSERT OR REPLACE INTO sessions (client_id, owner) VALUES (?, ?)", (client_id, owner))

    def forget_session(self, client_id: str) -> None:
        """Drop a session with its subscriptions and queue (its client connected with a clean session)."""
        with self._transaction():
            for table in ("sessions", "subscriptions", "queued"):
                self._db.execute(f"DELETE FROM {table} WHERE client_id = ?", (client_id,))

    def subscribe(self, client_id: str, topic_filter: str, qos: int) -> None:
        """Record a persistent session's subscription."""
        self._db.execute(
            "INSERT OR REPLACE INTO subscriptions (client_id, topic_filter, qos) VALUES (?, ?, ?)",
            (client_id, topic_filter, qos),
        )

    def unsubscribe(self, client_id: str, topic_filters: Iterable[str]) -> None:
        """Drop a persistent session's subscriptions."""
        with self._transaction():
            for topic_filter in topic_filters:
                self._db.execute(
                    "DELETE FROM subscriptions WHERE client_id = ? AND topic_filter = ?", (client_id, topic_filter)
                )

    # -- messages -------------------------------------------------------------------------------

    def accept(self, topic: str, payload: bytes, qos: int, retain: bool, owner: str | None) -> int:
        """Record a message about to be acknowledged to its publisher; returns its inbox id."""
        cursor = self._db.execute(
            "INSERT INTO inbox (topic, payload, qos, retain, owner) VALUES (?, ?, ?, ?, ?)",
            (topic, payload, qos, int(retain), owner),
        )
        return int(cursor.lastrowid or 0)

    def drop_inbox(self, inbox_id: int) -> None:
        """Forget an accepted message that was refused or had no subscriber."""
        self._db.execute("DELETE FROM inbox WHERE id = ?", (inbox_id,))

    def route(self, inbox_id: int | None, deliveries: Sequence[tuple[str, str, bytes, int]]) -> list[int]:
        """Queue `(client_id, topic, payload, qos)` deliveries and retire the inbox row, in one transaction.

        Returns the queued ids, in the order of `deliveries`.
        """
        if inbox_id is None and not deliveries:
            return []
        with self._transaction():
            ids = [
                int(
                    self._db.execute(
                        "INSERT INTO queued (client_id, topic, payload, qos) VALUES (?, ?, ?, ?)", delivery
                    ).lastrowid
                    or 0
                )
                for delivery in deliveries
            ]
            if inbox_id is not None:
                self._db.execute("DELETE FROM inbox WHERE id = ?", (inbox_id,))
        return ids

    def delivered(self, queued_id: int) -> None:
        """The client acknowledged a queued message."""
        self._db.execute("DELETE FROM queued WHERE id = ?", (queued_id,))

    def retain(self, topic: str, payload: bytes, qos: int) -> None:
        """Keep `payload` as the retained message of `topic`."""
        self._db.execute(
            "INSERT OR REPLACE INTO retained (topic, payload, qos) VALUES (?, ?, ?)", (topic, payload, qos)
        )

    def unretain(self, topic: str) -> None:
        """`topic` has no retained message any more."""
        self._db.execute("DELETE FROM retained WHERE topic = ?", (topic,))

    # -- helpers ----------------------------------------------------------------------------------

    def _transaction(self) -> _Transaction:
        return _Transaction(self._db)


class _Transaction:
    """BEGIN ... COMMIT (ROLLBACK on an exception) on an autocommit connection."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self._db = db

    def __enter__(self) -> None:
        self._db.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, _exc: object, _tb: object) -> None:
        self._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
