"""The audit log in the database: `record()` appends an action inside the caller's transaction, `checkpoint()`
signs the committed head, `verify()` checks the stored chain against the checkpoints and the head file.

Sequencing. An entry's seq and prev_hash come from the chain's head, so no two writers may read the same head.
`record()` holds the head until the caller's transaction ends:

- PostgreSQL: `pg_advisory_xact_lock`, released at commit or rollback. Coordinators sharing a database queue
  there, and under READ COMMITTED the head read after the lock sees the previous holder's committed entry.
- SQLite: one writer at a time, but pysqlite begins a transaction only at its first write, so a head read
  before that write may be stale by the time of the insert. `record()` therefore writes first, an UPDATE that
  matches no row (it takes the write lock, waiting out the busy timeout), and reads the head after it: no
  other connection can append until this transaction ends. The alternative, inserting and retrying on the
  unique seq, needs a savepoint per attempt and cannot recover a transaction that holds a stale snapshot.

The unique `seq` and `hash` columns are the backstop: a writer that bypassed the lock would fail on insert
rather than fork the chain. The lock is held until the caller commits, so call `record()` last.
"""

from __future__ import annotations

import json
import re
from datetime import datetime
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy import text
from sqlmodel import Session, col, select

from cloud.audit.chain import (
    GENESIS_HASH,
    AuditReport,
    ChainEntry,
    SignedHead,
    chain_problems,
    entry_hash,
    normalize_details,
    signature_valid,
    timestamp,
    verify_chain,
)
from cloud.audit.keys import sign_head
from cloud.errors import ConflictError
from cloud.models import AuditCheckpoint, AuditEntry, as_utc
from cloud.pki import private_write
from protocol.messages import utcnow

__all__ = [
    "HEAD_FILE",
    "checkpoint",
    "head_seq",
    "list_entries",
    "read_head_file",
    "record",
    "signed_head",
    "unsigned_entries",
    "verify",
    "write_head_file",
]

HEAD_FILE = "audit-head.json"  # in data_dir: the newest checkpoint, outside the database
_HEAD_FORMAT = 1
_LOCK_KEY = int.from_bytes(b"efaudit1", "big")  # the PostgreSQL advisory lock of the chain's head
_ACTION = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
_LIMITS = {"actor": 160, "action": 64, "subject": 256}  # the columns' lengths
_ANCHOR_CANDIDATES = 10


def record(
    *, session: Session, actor: str, action: str, subject: str = "", details: dict[str, Any] | None = None
) -> AuditEntry:
    """Append `action` by `actor` on `subject` in the caller's transaction; the caller commits or rolls back."""
    _check(actor=actor, action=action, subject=subject)
    clean = normalize_details(details or {})
    session.flush()  # the caller's writes first: their errors stay theirs, and the lock is held for less
    _lock_head(session)
    prev_seq, prev_hash = _head(session)
    seq, at = prev_seq + 1, utcnow()
    entry = AuditEntry(
        seq=seq,
        at=at,
        actor=actor,
        action=action,
        subject=subject,
        details=clean,
        prev_hash=prev_hash,
        hash=entry_hash(prev_hash, seq, at, actor, action, subject, clean),
    )
    session.add(entry)
    session.flush()
    return entry


def _check(**fields: str) -> None:
    """`ValueError` naming the caller's mistake: an action not like `model.pushed`, no actor, a value too long."""
    if not _ACTION.match(fields["action"]):
        raise ValueError(f"audit action {fields['action']!r} must be dotted lower-case words, like 'model.pushed'")
    if not fields["actor"]:
        raise ValueError(f"audit action {fields['action']!r} needs an actor (a token name or 'device:<id>')")
    for name, value in fields.items():
        if len(value) > _LIMITS[name]:
            raise ValueError(f"audit {name} {value[:40]!r}... is {len(value)} characters; at most {_LIMITS[name]}")


def _lock_head(session: Session) -> None:
    """Hold the chain's head until the transaction ends (see the module docstring)."""
    connection = session.connection()
    if connection.dialect.name == "postgresql":
        connection.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _LOCK_KEY})
    else:
        connection.execute(text("UPDATE audit_entry SET seq = seq WHERE 1 = 0"))


def _head(session: Session) -> tuple[int, str]:
    """(seq, hash) of the newest entry; (0, the genesis hash) for an empty chain."""
    statement = select(AuditEntry.seq, AuditEntry.hash).order_by(col(AuditEntry.seq).desc()).limit(1)
    row = session.exec(statement).first()
    return (int(row[0]), str(row[1])) if row is not None else (0, GENESIS_HASH)


def head_seq(*, session: Session) -> int:
    """The newest entry's seq (0 for an empty log)."""
    return _head(session)[0]


def list_entries(
    *,
    session: Session,
    after_seq: int | None = None,
    limit: int = 100,
    actor: str | None = None,
    action: str | None = None,
) -> list[AuditEntry]:
    """Entries after `after_seq` (oldest first), or the newest `limit` when it is None; optionally filtered."""
    statement = select(AuditEntry)
    if actor is not None:
        statement = statement.where(AuditEntry.actor == actor)
    if action is not None:
        statement = statement.where(AuditEntry.action == action)
    if after_seq is not None:
        ascending = statement.where(col(AuditEntry.seq) > after_seq).order_by(col(AuditEntry.seq)).limit(limit)
        return list(session.exec(ascending))
    newest = statement.order_by(col(AuditEntry.seq).desc()).limit(limit)
    return list(reversed(list(session.exec(newest))))


# -- checkpoints -----------------------------------------------------------------------------------


def signed_head(row: AuditCheckpoint) -> SignedHead:
    """A checkpoint row as the chain logic sees it."""
    return SignedHead(seq=row.seq, hash=row.hash, keyid=row.keyid, signature=row.signature, at=as_utc(row.at))


def _hash_at(session: Session, seq: int) -> str | None:
    return session.exec(select(AuditEntry.hash).where(AuditEntry.seq == seq)).first()


def _anchor(session: Session, public_key: Ed25519PublicKey) -> AuditCheckpoint | None:
    """The newest checkpoint that this key signed and the chain still matches."""
    statement = select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq).desc()).limit(_ANCHOR_CANDIDATES)
    for row in session.exec(statement):
        if signature_valid(public_key, signed_head(row)) and _hash_at(session, row.seq) == row.hash:
            return row
    return None


def unsigned_entries(*, session: Session, public_key: Ed25519PublicKey) -> tuple[int, datetime | None]:
    """How many entries no valid checkpoint covers yet, and when the oldest of them was recorded."""
    anchor = _anchor(session, public_key)
    after = anchor.seq if anchor is not None else 0
    unsigned = _head(session)[0] - after
    statement = select(AuditEntry.at).where(col(AuditEntry.seq) > after).order_by(col(AuditEntry.seq)).limit(1)
    oldest = session.exec(statement).first()
    return unsigned, as_utc(oldest)


def _chain_entries(session: Session, *, after_seq: int = 0, upto_seq: int | None = None) -> list[ChainEntry]:
    """The stored entries with seq in (after_seq, upto_seq], ascending (all of them by default)."""
    statement = select(AuditEntry).order_by(col(AuditEntry.seq))
    if after_seq:
        statement = statement.where(col(AuditEntry.seq) > after_seq)
    if upto_seq is not None:
        statement = statement.where(col(AuditEntry.seq) <= upto_seq)
    return [
        ChainEntry(
            seq=r.seq,
            at=r.at,
            actor=r.actor,
            action=r.action,
            subject=r.subject,
            details=r.details,
            prev_hash=r.prev_hash,
            hash=r.hash,
        )
        for r in session.exec(statement)
    ]


def checkpoint(*, session: Session, key: Ed25519PrivateKey) -> AuditCheckpoint | None:
    """Sign the committed head and store the checkpoint (committed); None for an empty log.

    Only a chain that verifies from the previous valid checkpoint on is signed: `ConflictError` otherwise.
    """
    head = _head(session)
    if head[0] == 0:
        return None
    anchor = _anchor(session, key.public_key())
    if anchor is not None and anchor.seq == head[0]:
        return anchor
    after_seq, after_hash = (anchor.seq, anchor.hash) if anchor is not None else (0, GENESIS_HASH)
    segment = _chain_entries(session, after_seq=after_seq, upto_seq=head[0])
    if problems := chain_problems(segment, after_seq=after_seq, after_hash=after_hash):
        raise ConflictError(
            f"refusing to sign the audit log: {problems[0].message} (seq {problems[0].seq}); "
            "see `edgefleet audit verify`"
        )
    signed = sign_head(key, seq=head[0], head_hash=head[1])
    row = AuditCheckpoint(
        seq=signed.seq, hash=signed.hash, keyid=signed.keyid, signature=signed.signature, at=signed.at or utcnow()
    )
    session.add(row)
    session.commit()
    session.refresh(row)
    return row


# -- the head file ---------------------------------------------------------------------------------


def write_head_file(path: Path, head: SignedHead) -> None:
    """Keep `head` in `path` (temp file + `os.replace`), unless the file already holds a newer seq."""
    try:
        current = read_head_file(path)
    except ValueError:
        current = None  # unreadable: replace it with a good one
    if current is not None and current.seq > head.seq:
        return
    body = {
        "format": _HEAD_FORMAT,
        "seq": head.seq,
        "hash": head.hash,
        "keyid": head.keyid,
        "signature": head.signature,
        "at": timestamp(head.at) if head.at is not None else None,
    }
    private_write(path, (json.dumps(body, indent=2, sort_keys=True) + "\n").encode())


def read_head_file(path: Path) -> SignedHead | None:
    """The checkpoint kept in `path`; None if there is no file, `ValueError` if it cannot be read."""
    try:
        body = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read the audit head file {path}: {exc}") from exc
    if not isinstance(body, dict) or body.get("format") != _HEAD_FORMAT:
        raise ValueError(f"the audit head file {path} is not of format {_HEAD_FORMAT}")
    try:
        at = datetime.fromisoformat(body["at"]) if body.get("at") else None
        return SignedHead(
            seq=int(body["seq"]),
            hash=str(body["hash"]),
            keyid=str(body["keyid"]),
            signature=str(body["signature"]),
            at=at,
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"the audit head file {path} lacks or garbles {exc}") from exc


# -- verification ----------------------------------------------------------------------------------


def verify(*, session: Session, public_key: Ed25519PublicKey, head_file: Path | None) -> AuditReport:
    """Recompute every hash and link, check every checkpoint and the head file: the problems by seq, or OK."""
    entries = _chain_entries(session)
    checkpoints = [signed_head(row) for row in session.exec(select(AuditCheckpoint).order_by(col(AuditCheckpoint.seq)))]
    head, error = None, None
    if head_file is not None:
        try:
            head = read_head_file(head_file)
        except ValueError as exc:
            error = str(exc)
    return verify_chain(entries, checkpoints, head, public_key, head_file_error=error)
