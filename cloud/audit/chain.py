"""The audit chain without IO: canonical entry hashes, checkpoint signatures, and finding what was tampered with.

An entry's hash is the sha256 of the canonical JSON (sorted keys, no whitespace, UTF-8) of its seq, time (UTC,
microseconds), actor, action, subject, details and the previous entry's hash (`GENESIS_HASH` for seq 1), so
editing, deleting, reordering or inserting an entry breaks the chain where it happened. A checkpoint is an
Ed25519 signature of `f"{seq}:{hash}"` of the head made with the coordinator's audit key: a chain rewritten up
to a checkpoint, or cut back behind one, no longer matches a signature. `cloud.audit.service` does the IO.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from pydantic import BaseModel

__all__ = [
    "GENESIS_HASH",
    "AuditProblem",
    "AuditReport",
    "ChainEntry",
    "ProblemKind",
    "SignedHead",
    "canonical_json",
    "chain_problems",
    "checkpoint_due",
    "checkpoint_message",
    "entry_hash",
    "keyid_of",
    "normalize_details",
    "signature_valid",
    "timestamp",
    "verify_chain",
]

GENESIS_HASH = "0" * 64
_SEARCH = 16  # how far from its stored seq a moved entry's original seq is looked for
_MAX_SEARCHES = 10_000  # mismatched entries whose original seq is looked for at all


def canonical_json(value: Any) -> str:
    """The one encoding hashes are taken over: sorted keys, no whitespace, no NaN, non-ASCII as UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def normalize_details(details: Mapping[str, Any]) -> dict[str, Any]:
    """`details` as the database gives them back (tuples → lists, keys → str); `ValueError` if not JSON."""
    try:
        normal: dict[str, Any] = json.loads(canonical_json(dict(details)))
    except (TypeError, ValueError) as exc:
        raise ValueError(f"audit details must be JSON values (str, number, bool, None, list, dict): {exc}") from exc
    return normal


def timestamp(at: datetime) -> str:
    """ISO-8601 in UTC with microseconds, e.g. `2026-01-02T03:04:05.000006Z`; a naive time is taken as UTC."""
    aware = at if at.tzinfo is not None else at.replace(tzinfo=UTC)
    return aware.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def entry_hash(
    prev_hash: str, seq: int, at: datetime, actor: str, action: str, subject: str, details: Mapping[str, Any]
) -> str:
    """The sha256 (hex) of an entry's canonical JSON, which includes the previous entry's hash."""
    body = {
        "prev_hash": prev_hash,
        "seq": seq,
        "at": timestamp(at),
        "actor": actor,
        "action": action,
        "subject": subject,
        "details": dict(details),
    }
    return hashlib.sha256(canonical_json(body).encode()).hexdigest()


def checkpoint_message(seq: int, head_hash: str) -> bytes:
    """What a checkpoint signs: `f"{seq}:{hash}"`."""
    return f"{seq}:{head_hash}".encode()


def keyid_of(public_key: Ed25519PublicKey) -> str:
    """The sha256 (hex) of the raw 32-byte public key."""
    return hashlib.sha256(public_key.public_bytes(Encoding.Raw, PublicFormat.Raw)).hexdigest()


@dataclass(frozen=True)
class ChainEntry:
    """One stored entry: what its hash covers, and the hash stored with it."""

    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: Mapping[str, Any]
    prev_hash: str
    hash: str

    def hash_at(self, seq: int) -> str:
        """This entry's hash as if it stood at `seq`."""
        return entry_hash(self.prev_hash, seq, self.at, self.actor, self.action, self.subject, self.details)


@dataclass(frozen=True)
class SignedHead:
    """A signature of the chain's head at `seq`: a checkpoint row, or the head file's copy of the newest one."""

    seq: int
    hash: str
    keyid: str
    signature: str  # hex
    at: datetime | None = None


def signature_valid(public_key: Ed25519PublicKey, head: SignedHead) -> bool:
    """Whether `head.signature` is the key's signature of `f"{seq}:{hash}"`."""
    try:
        public_key.verify(bytes.fromhex(head.signature), checkpoint_message(head.seq, head.hash))
    except (InvalidSignature, ValueError):
        return False
    return True


def checkpoint_due(
    *, unsigned: int, oldest_unsigned_at: datetime | None, now: datetime, every_entries: int, every_s: float
) -> bool:
    """A checkpoint is due after `every_entries` unsigned entries, or when the oldest has waited `every_s`."""
    if unsigned <= 0:
        return False
    if unsigned >= every_entries:
        return True
    return oldest_unsigned_at is not None and (now - oldest_unsigned_at).total_seconds() >= every_s


# -- the report ------------------------------------------------------------------------------------


class ProblemKind(StrEnum):
    """What `verify_chain` can find."""

    EDITED = "edited"  # an entry's contents no longer match its hash
    DELETED = "deleted"  # seq numbers missing in the chain
    REORDERED = "reordered"  # two entries swapped their seq numbers
    MOVED = "moved"  # entries hashed for other seq numbers (renumbered after a deletion or insertion)
    INSERTED = "inserted"  # an entry the chain skips: its successor links to the entry before it
    BROKEN_LINK = "broken_link"  # an entry's prev_hash is not its predecessor's hash (predecessor rewritten)
    TRUNCATED = "truncated"  # the chain ends before a seq that was signed
    FORGED_CHECKPOINT = "forged_checkpoint"  # a checkpoint or head file whose signature does not verify
    UNKNOWN_KEY = "unknown_key"  # a checkpoint signed by another key than this coordinator's audit key
    CHECKPOINT_MISMATCH = "checkpoint_mismatch"  # the chain's hash at a signed seq differs from the signed one
    HEAD_FILE = "head_file"  # the head file cannot be read


class AuditProblem(BaseModel):
    """One finding: its kind, the seq it concerns, and what it means."""

    kind: ProblemKind
    seq: int | None
    message: str


class AuditReport(BaseModel):
    """The result of verifying the audit log: `ok` when no problem was found."""

    ok: bool
    entries: int
    head_seq: int
    head_hash: str
    checkpoints: int
    latest_checkpoint_seq: int | None
    head_file_seq: int | None
    keyid: str
    problems: list[AuditProblem]
    notes: list[str]

    def summary(self) -> str:
        """`OK: ...` and notes, or a line per problem."""
        signed = f"latest at seq {self.latest_checkpoint_seq}" if self.checkpoints else "none yet"
        state = f"{self.entries} entries (head seq {self.head_seq}), {self.checkpoints} checkpoints ({signed})"
        if self.ok:
            return "\n".join([f"OK: {state}", *(f"  note: {note}" for note in self.notes)])
        lines = [f"{len(self.problems)} problem(s) in the audit log: {state}"]
        lines += [f"  seq {p.seq if p.seq is not None else '-'}: {p.kind.value}: {p.message}" for p in self.problems]
        return "\n".join(lines)


def _problem(kind: ProblemKind, seq: int | None, message: str) -> AuditProblem:
    return AuditProblem(kind=kind, seq=seq, message=message)


# -- the chain -------------------------------------------------------------------------------------


def chain_problems(
    entries: Sequence[ChainEntry], *, after_seq: int = 0, after_hash: str = GENESIS_HASH
) -> list[AuditProblem]:
    """What is wrong with `entries` (ascending seq), which follow the entry `after_seq` whose hash is `after_hash`."""
    origins = _origins(entries, after_seq, after_hash)
    problems = _gaps(entries, after_seq) + _edits(entries, origins) + _moves(entries, origins)
    problems += _links(entries, origins, after_seq, after_hash)
    return sorted(problems, key=lambda p: p.seq if p.seq is not None else 0)


def _origins(entries: Sequence[ChainEntry], after_seq: int, after_hash: str) -> dict[int, int | None]:
    """For each stored seq, the seq the entry's hash was made for (None: its contents changed)."""
    by_hash = {e.hash: e for e in entries}
    origins: dict[int, int | None] = {}
    searches = 0
    for entry in entries:
        if entry.hash_at(entry.seq) == entry.hash:
            origins[entry.seq] = entry.seq
            continue
        searches += 1
        if searches > _MAX_SEARCHES:  # a chain rewritten wholesale: report edits, don't hash it 30 times over
            origins[entry.seq] = None
            continue
        candidates = _candidates(entry, by_hash, origins, after_seq, after_hash)
        origins[entry.seq] = next((s for s in candidates if s > after_seq and entry.hash_at(s) == entry.hash), None)
    return origins


def _candidates(
    entry: ChainEntry, by_hash: dict[str, ChainEntry], origins: dict[int, int | None], after_seq: int, after_hash: str
) -> Iterator[int]:
    """Where a moved entry may have come from: after its predecessor by hash, else near its stored seq."""
    if entry.prev_hash == after_hash:
        yield after_seq + 1
    if (predecessor := by_hash.get(entry.prev_hash)) is not None:
        yield (origins.get(predecessor.seq) or predecessor.seq) + 1
    for distance in range(1, _SEARCH + 1):
        yield entry.seq - distance
        yield entry.seq + distance


def _gaps(entries: Sequence[ChainEntry], after_seq: int) -> list[AuditProblem]:
    problems, expected = [], after_seq + 1
    for entry in entries:
        if entry.seq < expected:
            problems.append(_problem(ProblemKind.INSERTED, entry.seq, f"seq {entry.seq} is before the chain's start"))
            continue
        if entry.seq > expected:
            which = f"entry {expected} is" if entry.seq == expected + 1 else f"entries {expected}..{entry.seq - 1} are"
            problems.append(_problem(ProblemKind.DELETED, expected, f"{which} missing: deleted"))
        expected = entry.seq + 1
    return problems


def _edits(entries: Sequence[ChainEntry], origins: dict[int, int | None]) -> list[AuditProblem]:
    return [
        _problem(
            ProblemKind.EDITED,
            e.seq,
            f"entry {e.seq} ({e.action} by {e.actor}) does not match its hash: its contents were changed",
        )
        for e in entries
        if origins[e.seq] is None
    ]


def _moves(entries: Sequence[ChainEntry], origins: dict[int, int | None]) -> list[AuditProblem]:
    """Swapped pairs as `reordered`; other moved entries as runs of one offset (renumbered)."""
    moved = {e.seq: o for e in entries if (o := origins[e.seq]) is not None and o != e.seq}
    swapped = {s for s, o in moved.items() if moved.get(o) == s}
    problems = [
        _problem(
            ProblemKind.REORDERED, s, f"entries {s} and {moved[s]} were swapped: each is hashed for the other's seq"
        )
        for s in sorted(swapped)
        if s < moved[s]
    ]
    for first, last, offset in _runs({s: o - s for s, o in moved.items() if s not in swapped}):
        cause = "an entry before them was deleted" if offset > 0 else "an entry was inserted before them"
        if first == last:
            where = f"entry {first} is hashed for seq {first + offset}"
        else:
            where = f"entries {first}..{last} are hashed for seqs {first + offset}..{last + offset}"
        problems.append(_problem(ProblemKind.MOVED, first, f"{where}: renumbered, {cause}"))
    return problems


def _runs(offsets: dict[int, int]) -> Iterator[tuple[int, int, int]]:
    """(first, last, offset) of the runs of consecutive seqs moved by the same offset."""
    run: list[int] = []
    for seq in sorted(offsets):
        if run and (seq != run[-1] + 1 or offsets[seq] != offsets[run[0]]):
            yield run[0], run[-1], offsets[run[0]]
            run = []
        run.append(seq)
    if run:
        yield run[0], run[-1], offsets[run[0]]


def _links(
    entries: Sequence[ChainEntry], origins: dict[int, int | None], after_seq: int, after_hash: str
) -> list[AuditProblem]:
    """Entries in place whose prev_hash is not the hash of the entry in place before them."""
    at_seq = {e.seq: e for e in entries}

    def hash_in_place(seq: int) -> str | None:
        if seq == after_seq:
            return after_hash
        entry = at_seq.get(seq)
        return entry.hash if entry is not None and origins[seq] == seq else None

    problems = []
    for entry in entries:
        expected = hash_in_place(entry.seq - 1)
        if origins[entry.seq] != entry.seq or expected is None or entry.prev_hash == expected:
            continue  # moved, edited or missing neighbours are reported already
        if entry.prev_hash == hash_in_place(entry.seq - 2):
            message = f"entry {entry.seq - 1} is not part of the chain: entry {entry.seq} links past it (inserted)"
            problems.append(_problem(ProblemKind.INSERTED, entry.seq - 1, message))
        else:
            message = (
                f"entry {entry.seq} does not link to entry {entry.seq - 1}: entry {entry.seq - 1} was replaced "
                "or rewritten with a recomputed hash"
            )
            problems.append(_problem(ProblemKind.BROKEN_LINK, entry.seq, message))
    return problems


# -- checkpoints and the head file -----------------------------------------------------------------


def _signed_problems(
    head: SignedHead, what: str, at_seq: dict[int, ChainEntry], public_key: Ed25519PublicKey
) -> list[AuditProblem]:
    """A signed head's own problems (key, signature) and whether the chain still has its hash at its seq."""
    ours = keyid_of(public_key)
    if head.keyid != ours:
        message = f"{what} at seq {head.seq} is signed by key {head.keyid[:16]}, not the audit key {ours[:16]}"
        return [_problem(ProblemKind.UNKNOWN_KEY, head.seq, message)]
    if not signature_valid(public_key, head):
        message = f"the signature of {what} at seq {head.seq} does not verify: it was forged or altered"
        return [_problem(ProblemKind.FORGED_CHECKPOINT, head.seq, message)]
    entry = at_seq.get(head.seq)
    if entry is not None and entry.hash != head.hash:
        message = f"the chain's hash at seq {head.seq} is not the one {what} signed: entries up to it were rewritten"
        return [_problem(ProblemKind.CHECKPOINT_MISMATCH, head.seq, message)]
    return []


def _truncation(
    signed: list[tuple[str, SignedHead]], head_seq: int, public_key: Ed25519PublicKey
) -> list[AuditProblem]:
    """One problem if a valid signature covers a seq beyond the chain's head."""
    beyond = [(what, h) for what, h in signed if h.seq > head_seq and signature_valid(public_key, h)]
    if not beyond:
        return []
    what, newest = max(beyond, key=lambda item: item[1].seq)
    when = f" at {timestamp(newest.at)}" if newest.at is not None else ""
    message = (
        f"the chain ends at seq {head_seq}, but {what} signed seq {newest.seq}{when}: "
        f"entries {head_seq + 1}..{newest.seq} were deleted"
    )
    return [_problem(ProblemKind.TRUNCATED, head_seq + 1, message)]


def verify_chain(
    entries: Sequence[ChainEntry],
    checkpoints: Sequence[SignedHead],
    head_file: SignedHead | None,
    public_key: Ed25519PublicKey,
    *,
    head_file_error: str | None = None,
) -> AuditReport:
    """Check every hash and link of `entries`, every checkpoint, and the head file against `public_key`."""
    ordered = sorted(entries, key=lambda e: e.seq)
    at_seq = {e.seq: e for e in ordered}
    head = ordered[-1] if ordered else None
    head_seq = head.seq if head is not None else 0
    signed = [("the checkpoint", c) for c in sorted(checkpoints, key=lambda c: c.seq)]
    signed += [("the head file", head_file)] if head_file is not None else []
    problems = chain_problems(ordered)
    for what, signed_head in signed:
        problems += _signed_problems(signed_head, what, at_seq, public_key)
    problems += _truncation(signed, head_seq, public_key)
    if head_file_error:
        problems.append(_problem(ProblemKind.HEAD_FILE, None, head_file_error))
    latest = max((c.seq for c in checkpoints), default=None)
    return AuditReport(
        ok=not problems,
        entries=len(ordered),
        head_seq=head_seq,
        head_hash=head.hash if head is not None else GENESIS_HASH,
        checkpoints=len(checkpoints),
        latest_checkpoint_seq=latest,
        head_file_seq=head_file.seq if head_file is not None else None,
        keyid=keyid_of(public_key),
        problems=problems,
        notes=_notes(head_seq, latest, head_file, head_file_error),
    )


def _notes(head_seq: int, latest: int | None, head_file: SignedHead | None, error: str | None) -> list[str]:
    """What the report cannot vouch for (not problems)."""
    notes = []
    if latest is None and head_seq:
        notes.append("no checkpoint yet: no entry is covered by a signature")
    elif latest is not None and head_seq > latest:
        notes.append(f"entries after seq {latest} are not covered by a checkpoint yet")
    if head_file is None and error is None:
        notes.append("no head file: truncation is checked against the checkpoint rows only")
    return notes
