"""The audit log, attacked: edited, deleted, reordered, inserted and truncated entries, forged checkpoints, and
writers racing for the chain's head, on SQLite and PostgreSQL. The chain of real API actions verifies.

Tampering goes straight to the database (as a database administrator or an injected statement would); only the
audit key in the PKI directory and the head file in the data directory are out of its reach.
"""

from __future__ import annotations

import hashlib
import json
import threading
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import delete, insert, update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud.audit import GENESIS_HASH, AuditCheckpointer, entry_hash, record
from cloud.audit.chain import ChainEntry, checkpoint_due, keyid_of, timestamp
from cloud.audit.keys import sign_head
from cloud.audit.service import read_head_file, write_head_file
from cloud.auth import Role
from cloud.errors import ConflictError
from cloud.models import AuditCheckpoint, AuditEntry
from cloud.services.tokens import create_token
from protocol.messages import utcnow


@pytest.fixture
def signer(engine: Engine, tmp_path: Path) -> AuditCheckpointer:
    """The coordinator's checkpointer on its own key and head file (not started)."""
    return AuditCheckpointer(engine=engine, key=Ed25519PrivateKey.generate(), head_file=tmp_path / "audit-head.json")


@pytest.fixture
def chain(engine: Engine, signer: AuditCheckpointer) -> AuditCheckpointer:
    """Entries 1..10, signed at seq 10 (a checkpoint row and the head file)."""
    append(engine, 10)
    checkpoint = signer.checkpoint()
    assert checkpoint is not None and checkpoint.seq == 10
    return signer


def append(engine: Engine, count: int, *, actor: str = "alice") -> None:
    with Session(engine) as session:
        first = session.exec(select(AuditEntry.seq).order_by(col(AuditEntry.seq).desc())).first() or 0
        for n in range(first + 1, first + 1 + count):
            record(session=session, actor=actor, action="model.pushed", subject=f"digits:{n}", details={"n": n})
        session.commit()


def tamper(engine: Engine, *statements: object) -> None:
    with engine.begin() as connection:
        for statement in statements:
            connection.execute(statement)  # type: ignore[call-overload]


def found(signer: AuditCheckpointer) -> list[tuple[str, int | None]]:
    return [(p.kind.value, p.seq) for p in signer.verify().problems]


def entry(engine: Engine, seq: int) -> AuditEntry:
    with Session(engine) as session:
        row = session.exec(select(AuditEntry).where(AuditEntry.seq == seq)).one()
        session.expunge(row)
        return row


def rehash(
    row: AuditEntry, *, prev_hash: str | None = None, seq: int | None = None, details: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The values an attacker who knows the hash function writes for a changed entry."""
    prev, number = prev_hash or row.prev_hash, seq or row.seq
    body = row.details if details is None else details
    digest = entry_hash(prev, number, row.at, row.actor, row.action, row.subject, body)
    return {"prev_hash": prev, "seq": number, "details": body, "hash": digest}


# -- the hash ----------------------------------------------------------------------------------------


def test_entry_hash_is_the_sha256_of_canonical_json() -> None:
    at = datetime(2026, 1, 2, 3, 4, 5, 6, tzinfo=UTC)
    body = (
        '{"action":"model.pushed","actor":"ci","at":"2026-01-02T03:04:05.000006Z","details":{"a":[1,2],"é":"日本"},'
        f'"prev_hash":"{GENESIS_HASH}","seq":1,"subject":"digits:1.0"}}'
    )
    expected = hashlib.sha256(body.encode()).hexdigest()
    details = {"é": "日本", "a": [1, 2]}
    assert entry_hash(GENESIS_HASH, 1, at, "ci", "model.pushed", "digits:1.0", details) == expected
    elsewhere = at.astimezone(timezone(timedelta(hours=2)))  # the same instant in another zone, and naive UTC
    assert entry_hash(GENESIS_HASH, 1, elsewhere, "ci", "model.pushed", "digits:1.0", details) == expected
    naive = at.replace(tzinfo=None)
    assert entry_hash(GENESIS_HASH, 1, naive, "ci", "model.pushed", "digits:1.0", details) == expected
    assert timestamp(datetime(2026, 1, 2, tzinfo=UTC)) == "2026-01-02T00:00:00.000000Z"


def test_hash_survives_the_database_round_trip(engine: Engine) -> None:
    details = {
        "float": 0.1,
        "big": 2**62,
        "nested": {"z": [1, {"y": None}], "a": True},
        "text": 'é 日本 \u2028 "quoted" \\',
        "pair": (1, 2),
    }
    with Session(engine) as session:
        written = record(
            session=session, actor="device:cam-1", action="device.enrolled", subject="cam-1", details=details
        )
        at, stored_hash = written.at, written.hash
        session.commit()
    with Session(engine) as session:
        row = session.exec(select(AuditEntry)).one()
    assert row.details["pair"] == [1, 2]  # stored as the JSON it was hashed as
    assert timestamp(row.at) == timestamp(at) and at.microsecond == (row.at.microsecond)
    assert entry_hash(row.prev_hash, row.seq, row.at, row.actor, row.action, row.subject, row.details) == stored_hash
    assert row.hash == stored_hash and row.prev_hash == GENESIS_HASH and row.seq == 1


def test_an_entry_lands_with_the_callers_transaction_or_not_at_all(engine: Engine) -> None:
    with Session(engine) as session:
        record(session=session, actor="alice", action="token.created", subject="ci")
        session.rollback()
    with Session(engine) as session:
        assert session.exec(select(AuditEntry)).all() == []
        assert record(session=session, actor="alice", action="token.created", subject="ci").seq == 1
        session.commit()


@pytest.mark.parametrize(
    ("fields", "complaint"),
    [
        ({"action": "Model Pushed"}, "dotted lower-case"),
        ({"action": "pushed"}, "dotted lower-case"),
        ({"actor": ""}, "needs an actor"),
        ({"subject": "x" * 300}, "at most 256"),
        ({"details": {"when": datetime.now(UTC)}}, "JSON values"),
    ],
)
def test_record_refuses_what_the_chain_cannot_hold(engine: Engine, fields: dict, complaint: str) -> None:
    arguments = {"actor": "alice", "action": "model.pushed", "subject": "digits:1.0", "details": {}, **fields}
    with Session(engine) as session, pytest.raises(ValueError, match=complaint):
        record(session=session, **arguments)


# -- attacks -----------------------------------------------------------------------------------------


def test_intact_chain_verifies(chain: AuditCheckpointer) -> None:
    report = chain.verify()
    assert report.ok, report.summary()
    assert (report.entries, report.head_seq, report.checkpoints, report.head_file_seq) == (10, 10, 1, 10)
    assert report.summary().startswith("OK: 10 entries")


def test_edited_entry_is_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    tamper(engine, update(AuditEntry).where(col(AuditEntry.seq) == 5).values(details={"n": 500}))
    report = chain.verify()
    assert found(chain) == [("edited", 5)]
    assert "model.pushed by alice" in report.problems[0].message and not report.ok


def test_edited_entry_with_a_recomputed_hash_is_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    values = rehash(entry(engine, 5), details={"n": 500})
    tamper(engine, update(AuditEntry).where(col(AuditEntry.seq) == 5).values(**values))
    assert found(chain) == [("broken_link", 6)]


def test_chain_rewritten_from_an_entry_on_is_caught_by_the_signatures(engine: Engine, chain: AuditCheckpointer) -> None:
    prev_hash = entry(engine, 4).hash
    for seq in range(5, 11):  # rewrite 5 and re-link every later entry: the chain itself is consistent again
        values = rehash(entry(engine, seq), prev_hash=prev_hash, details={"n": 500} if seq == 5 else None)
        tamper(engine, update(AuditEntry).where(col(AuditEntry.seq) == seq).values(**values))
        prev_hash = str(values["hash"])
    assert found(chain) == [("checkpoint_mismatch", 10), ("checkpoint_mismatch", 10)]  # the row and the head file


def test_deleted_entry_is_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    tamper(engine, delete(AuditEntry).where(col(AuditEntry.seq) == 5))
    assert found(chain) == [("deleted", 5)]
    assert chain.verify().problems[0].message == "entry 5 is missing: deleted"


def test_deleted_entry_with_the_rest_renumbered_is_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    tamper(engine, delete(AuditEntry).where(col(AuditEntry.seq) == 5))
    for seq in range(6, 11):
        tamper(engine, update(AuditEntry).where(col(AuditEntry.seq) == seq).values(seq=seq - 1))
    problems = chain.verify().problems
    assert [(p.kind.value, p.seq) for p in problems] == [("moved", 5), ("truncated", 10)]
    assert "entries 5..9 are hashed for seqs 6..10" in problems[0].message
    assert "deleted" in problems[0].message


def test_reordered_entries_are_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    tamper(
        engine,
        update(AuditEntry).where(col(AuditEntry.seq) == 4).values(seq=-4),
        update(AuditEntry).where(col(AuditEntry.seq) == 5).values(seq=4),
        update(AuditEntry).where(col(AuditEntry.seq) == -4).values(seq=5),
    )
    problems = chain.verify().problems
    assert [(p.kind.value, p.seq) for p in problems] == [("reordered", 4)]
    assert "entries 4 and 5 were swapped" in problems[0].message


def test_inserted_entry_is_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    for seq in range(10, 5, -1):  # make room at 6
        tamper(engine, update(AuditEntry).where(col(AuditEntry.seq) == seq).values(seq=seq + 1))
    forged = rehash(entry(engine, 5), prev_hash=entry(engine, 5).hash, seq=6, details={"n": "forged"})
    five = entry(engine, 5)
    tamper(
        engine,
        insert(AuditEntry).values(at=five.at, actor=five.actor, action=five.action, subject=five.subject, **forged),
    )
    problems = chain.verify().problems
    moved = [p for p in problems if p.kind.value == "moved"]
    assert [(p.kind.value, p.seq) for p in moved] == [("moved", 7)]
    assert "entries 7..11 are hashed for seqs 6..10" in moved[0].message and "inserted" in moved[0].message
    assert {p.kind.value for p in problems} == {"moved", "checkpoint_mismatch"}


def test_truncated_chain_is_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    tamper(
        engine,
        delete(AuditEntry).where(col(AuditEntry.seq) > 7),
        delete(AuditCheckpoint).where(col(AuditCheckpoint.seq) > 7),  # the checkpoint rows go too
    )
    problems = chain.verify().problems
    assert [(p.kind.value, p.seq) for p in problems] == [("truncated", 8)]
    assert "the head file signed seq 10" in problems[0].message and "entries 8..10 were deleted" in problems[0].message


def test_truncated_chain_is_detected_by_a_checkpoint_row_without_the_head_file(
    engine: Engine, chain: AuditCheckpointer
) -> None:
    chain.head_file.unlink()
    tamper(engine, delete(AuditEntry).where(col(AuditEntry.seq) > 7))
    assert found(chain) == [("truncated", 8)]


def test_forged_checkpoint_is_detected(engine: Engine, chain: AuditCheckpointer) -> None:
    tamper(engine, update(AuditCheckpoint).values(hash="f" * 64))  # the signed hash altered
    assert found(chain) == [("forged_checkpoint", 10)]


def test_checkpoint_signed_with_another_key_under_this_keyid_is_detected(
    engine: Engine, chain: AuditCheckpointer
) -> None:
    append(engine, 2)
    mallory = sign_head(Ed25519PrivateKey.generate(), seq=12, head_hash=entry(engine, 12).hash)
    forged = {"hash": mallory.hash, "keyid": keyid_of(chain.public_key), "signature": mallory.signature}
    tamper(engine, insert(AuditCheckpoint).values(seq=12, at=utcnow(), **forged))
    assert found(chain) == [("forged_checkpoint", 12)]


def test_checkpoint_of_an_unknown_key_is_reported(engine: Engine, chain: AuditCheckpointer) -> None:
    other = sign_head(Ed25519PrivateKey.generate(), seq=10, head_hash=entry(engine, 10).hash)
    signed = {"hash": other.hash, "keyid": other.keyid, "signature": other.signature}
    tamper(engine, insert(AuditCheckpoint).values(seq=10, at=utcnow(), **signed))
    assert found(chain) == [("unknown_key", 10)]


def test_forged_head_file_is_detected(chain: AuditCheckpointer) -> None:
    body = json.loads(chain.head_file.read_text())
    chain.head_file.write_text(json.dumps({**body, "seq": 12}))  # claims more than was signed
    assert found(chain) == [("forged_checkpoint", 12)]


def test_unreadable_head_file_is_reported(chain: AuditCheckpointer) -> None:
    chain.head_file.write_text("{not json")
    problems = chain.verify().problems
    assert [(p.kind.value, p.seq) for p in problems] == [("head_file", None)]
    assert str(chain.head_file) in problems[0].message


def test_a_tampered_chain_is_not_signed(engine: Engine, chain: AuditCheckpointer) -> None:
    append(engine, 3)
    tamper(engine, update(AuditEntry).where(col(AuditEntry.seq) == 12).values(actor="mallory"))
    with pytest.raises(ConflictError, match="refusing to sign the audit log: entry 12"):
        chain.checkpoint()
    assert read_head_file(chain.head_file).seq == 10  # type: ignore[union-attr]


# -- checkpoints -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("unsigned", "waited_s", "due"),
    [(0, 3600, False), (1, 59, False), (1, 60, True), (99, 0, False), (100, 0, True), (250, 0, True)],
)
def test_checkpoint_is_due_after_100_entries_or_a_minute(unsigned: int, waited_s: float, due: bool) -> None:
    now = utcnow()
    oldest = now - timedelta(seconds=waited_s)
    assert checkpoint_due(unsigned=unsigned, oldest_unsigned_at=oldest, now=now, every_entries=100, every_s=60) is due


def test_checkpointer_signs_after_n_entries_or_when_the_oldest_waited(engine: Engine, tmp_path: Path) -> None:
    head_file = tmp_path / "audit-head.json"
    signer = AuditCheckpointer(
        engine=engine, key=Ed25519PrivateKey.generate(), head_file=head_file, every_entries=5, every_s=60
    )
    assert signer.tick() is None and not head_file.exists()
    append(engine, 4)
    assert signer.tick() is None
    append(engine, 1)
    assert (signed := signer.tick()) is not None and signed.seq == 5
    assert read_head_file(head_file) is not None and read_head_file(head_file).seq == 5  # type: ignore[union-attr]
    append(engine, 1)
    assert signer.tick() is None
    assert (later := signer.tick(utcnow() + timedelta(seconds=61))) is not None and later.seq == 6
    assert signer.checkpoint().seq == 6  # type: ignore[union-attr]  # nothing new: the same checkpoint
    with Session(engine) as session:
        assert len(session.exec(select(AuditCheckpoint)).all()) == 2


def test_stopping_signs_what_is_left(engine: Engine, signer: AuditCheckpointer) -> None:
    signer.start()
    append(engine, 2)
    signer.stop()
    assert read_head_file(signer.head_file).seq == 2  # type: ignore[union-attr]
    assert signer.verify().ok


def test_head_file_never_goes_back(engine: Engine, chain: AuditCheckpointer) -> None:
    older = sign_head(chain.key, seq=3, head_hash=entry(engine, 3).hash)
    write_head_file(chain.head_file, older)
    assert read_head_file(chain.head_file).seq == 10  # type: ignore[union-attr]


# -- concurrency -------------------------------------------------------------------------------------


def test_concurrent_writers_keep_one_unbroken_chain(engine: Engine, signer: AuditCheckpointer) -> None:
    """8 threads append at once (half of them while creating tokens); every seq is taken once, in one chain."""
    threads, per_thread = 8, 12
    start, errors = threading.Barrier(threads), []

    def writer(index: int) -> None:
        try:
            start.wait()
            for n in range(per_thread):
                with Session(engine) as session:
                    if index % 2:
                        create_token(session=session, name=f"t{index}-{n}", role=Role.VIEWER, created_by=f"w{index}")
                        continue
                    session.exec(select(AuditEntry.seq)).all()  # a read first: the head it saw may be stale
                    record(session=session, actor=f"w{index}", action="model.pushed", subject=f"m:{n}")
                    session.commit()
        except Exception as exc:  # reported below, with the thread
            errors.append(f"writer {index}: {exc!r}")

    workers = [threading.Thread(target=writer, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
    assert not errors, errors
    with Session(engine) as session:
        seqs = session.exec(select(AuditEntry.seq).order_by(col(AuditEntry.seq))).all()
    assert list(seqs) == list(range(1, threads * per_thread + 1))
    assert signer.verify().ok and signer.checkpoint() is not None


def test_chain_entry_hash_at_matches_entry_hash() -> None:
    at = utcnow()
    item = ChainEntry(seq=3, at=at, actor="a", action="x.y", subject="s", details={}, prev_hash=GENESIS_HASH, hash="")
    assert item.hash_at(3) == entry_hash(GENESIS_HASH, 3, at, "a", "x.y", "s", {})
