"""The fleet's TUF image repository, stored in the database and served under `/api/v1/tuf/`.

Roles: `root` (offline threshold keys; carries the `x-edgefleet` policy: director and approver keys),
`timestamp`, `snapshot`, `targets` (online keys); `targets` delegates `low/*/*/*` to the role `low` (online key)
and each approved high-risk version `high/{model}/{version}/*` to a role `high:{model}:{version}` whose keys and
threshold are the root's approvers. Consistent snapshots: every role but timestamp is served as
`{version}.{role}.json`. A high-risk role is stored unpublished until k approvers signed its exact bytes; only
then does `targets` delegate to it and `snapshot` list it (an under-signed published role would block every one
of its targets on devices).

Expiry policy (re-signed by the coordinator's runner when less than half is left): timestamp 1 day, snapshot 7
days, targets and low 30 days; high-risk roles 1 year (approvers re-approve after), root 1 year.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import unquote

from securesystemslib.signer import CryptoSigner, Key, Signature
from sqlalchemy import delete
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select
from tuf.api.metadata import (
    DelegatedRole,
    Delegations,
    Metadata,
    MetaFile,
    Root,
    Signed,
    Snapshot,
    TargetFile,
    Targets,
    Timestamp,
)
from tuf.api.serialization.json import JSONSerializer

from cloud import audit
from cloud.errors import ConflictError, InvalidInputError, NotFoundError
from cloud.governance.keys import online_signer
from cloud.models import ApprovalSignature, Approver, TufMetadata
from protocol.governance import LOW_ROLE, RootPolicy, root_policy

__all__ = ["EXPIRY", "ImageRepository", "parse_filename"]

EXPIRY: dict[str, timedelta] = {
    "root": timedelta(days=365),
    "timestamp": timedelta(days=1),
    "snapshot": timedelta(days=7),
    "targets": timedelta(days=30),
    LOW_ROLE: timedelta(days=30),
    "high": timedelta(days=365),
}
_SERIALIZER = JSONSerializer(compact=False)


def _expiry(role: str, now: datetime) -> datetime:
    kind = "high" if role.startswith("high:") else role
    return (now + EXPIRY[kind]).replace(microsecond=0)


def parse_filename(filename: str) -> tuple[str, int | None]:
    """`(role, version)` of a metadata file name: `3.targets.json`, `timestamp.json`, `2.high%3Ad%3A1.json`."""
    if not filename.endswith(".json"):
        raise NotFoundError(f"{filename} is not a metadata file")
    stem = unquote(filename[: -len(".json")])
    head, sep, rest = stem.partition(".")
    if sep and head.isdigit():
        return rest, int(head)
    return stem, None


def _key_value(key: Key) -> str:
    """What makes a key the same key whatever keyid names it (a key listed twice still counts once)."""
    return json.dumps(key.keyval, sort_keys=True)


@dataclass(frozen=True)
class Published:
    """What one publication changed (for the audit log and the API answer)."""

    role: str
    version: int


class ImageRepository:
    """Reads, signs and publishes the repository's metadata; every write is one database transaction."""

    def __init__(self, engine: Engine, pki_dir: Path, *, clock: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._pki_dir = pki_dir
        self._clock = clock or (lambda: datetime.now(UTC))
        self._lock = threading.Lock()  # one writer per coordinator process; the unique index covers the rest

    # -- reading ---------------------------------------------------------------------------------------

    @property
    def initialized(self) -> bool:
        """True once root metadata exists."""
        with Session(self._engine) as session:
            return self._row(session, "root") is not None

    def _row(
        self, session: Session, role: str, version: int | None = None, *, published: bool = True
    ) -> TufMetadata | None:
        statement = select(TufMetadata).where(TufMetadata.role == role)
        if version is not None:
            statement = statement.where(TufMetadata.version == version)
        if published:
            statement = statement.where(col(TufMetadata.published).is_(True))
        return session.exec(statement.order_by(col(TufMetadata.version).desc())).first()

    def metadata(self, session: Session, role: str, version: int | None = None) -> Metadata:
        """The newest (or `version`) published metadata of `role`; `NotFoundError` if there is none."""
        row = self._row(session, role, version)
        if row is None:
            raise NotFoundError(f"no metadata for role {role}" + (f" version {version}" if version else ""))
        return Metadata.from_bytes(row.data.encode())

    def file(self, session: Session, filename: str) -> bytes:
        """The bytes a TUF client asks for by file name (published metadata only)."""
        role, version = parse_filename(filename)
        if version is None and role != "timestamp" and role != "root":
            raise NotFoundError(f"{filename}: only timestamp.json is served without a version")
        row = self._row(session, role, version)
        if row is None:
            raise NotFoundError(f"no metadata file {filename}")
        return row.data.encode()

    def root(self, session: Session) -> Root:
        """The newest root."""
        signed = self.metadata(session, "root").signed
        assert isinstance(signed, Root)
        return signed

    def policy(self, session: Session) -> RootPolicy:
        """The root's governance policy (director and approver keys)."""
        return root_policy(self.root(session))

    # -- writing ---------------------------------------------------------------------------------------

    def _store(self, session: Session, md: Metadata, role: str, *, published: bool = True) -> None:
        data = md.to_bytes(_SERIALIZER).decode()
        session.add(TufMetadata(role=role, version=md.signed.version, data=data, published=published))

    def _sign(self, md: Metadata, role: str) -> Metadata:
        md.signatures.clear()
        md.sign(self._online(role))
        return md

    def _online(self, role: str) -> CryptoSigner:
        return online_signer(self._pki_dir, role)

    def online_keys(self) -> dict[str, Key]:
        """The public online key of every online role."""
        return {
            role: self._online(role).public_key for role in ("targets", "snapshot", "timestamp", LOW_ROLE, "director")
        }

    def initialize(self, root_md: Metadata) -> None:
        """Store root version 1 and the first targets, low, snapshot and timestamp; once only."""
        with self._lock, Session(self._engine) as session:
            if self._row(session, "root") is not None:
                raise ConflictError("the image repository is initialized already; rotate keys with `edgefleet keys`")
            now = self._clock()
            self._store(session, root_md, "root")
            low = Metadata(Targets(version=1, expires=_expiry(LOW_ROLE, now)))
            self._store(session, self._sign(low, LOW_ROLE), LOW_ROLE)
            targets = Targets(version=1, expires=_expiry("targets", now), delegations=self._delegations(session, {}))
            self._store(session, self._sign(Metadata(targets), "targets"), "targets")
            self._snapshot_and_timestamp(session, now)
            session.commit()

    def _delegations(self, session: Session, high_roles: dict[str, list[str]]) -> Delegations:
        """`low` (online key) first, then one role per approved high-risk version (root's approvers)."""
        low_key = self._online(LOW_ROLE).public_key
        keys: dict[str, Key] = {low_key.keyid: low_key}
        roles = {LOW_ROLE: DelegatedRole(LOW_ROLE, [low_key.keyid], 1, True, paths=["low/*/*/*"])}
        if high_roles:
            root = self.root(session)
            policy = root_policy(root)
            for keyid in policy.approver_keyids:
                keys[keyid] = root.keys[keyid]
            for name, paths in sorted(high_roles.items()):
                roles[name] = DelegatedRole(
                    name, sorted(policy.approver_keyids), policy.approval_threshold, True, paths
                )
        return Delegations(keys=keys, roles=roles)

    def _high_roles(self, session: Session) -> dict[str, list[str]]:
        """Every published high-risk role with its paths (from the current targets delegations)."""
        targets = self.metadata(session, "targets").signed
        assert isinstance(targets, Targets)
        delegated = targets.delegations.roles if targets.delegations and targets.delegations.roles else {}
        return {name: list(role.paths or []) for name, role in delegated.items() if name != LOW_ROLE}

    def _bump(self, session: Session, role: str, edit: Callable[[Signed], None], now: datetime) -> Metadata:
        md = self.metadata(session, role)
        edit(md.signed)
        md.signed.version += 1
        md.signed.expires = _expiry(role, now)
        return self._sign(md, role)

    def _snapshot_and_timestamp(self, session: Session, now: datetime) -> None:
        session.flush()
        meta = {f"{row.role}.json": MetaFile(version=row.version) for row in self._latest_rows(session)}
        try:
            snapshot = self.metadata(session, "snapshot")
            assert isinstance(snapshot.signed, Snapshot)
            snapshot.signed.meta = meta
            snapshot.signed.version += 1
            snapshot.signed.expires = _expiry("snapshot", now)
        except NotFoundError:
            snapshot = Metadata(Snapshot(version=1, expires=_expiry("snapshot", now), meta=meta))
        self._store(session, self._sign(snapshot, "snapshot"), "snapshot")
        session.flush()
        self._timestamp(session, snapshot.signed.version, now)

    def _timestamp(self, session: Session, snapshot_version: int, now: datetime) -> None:
        try:
            timestamp = self.metadata(session, "timestamp")
            assert isinstance(timestamp.signed, Timestamp)
            timestamp.signed.version += 1
        except NotFoundError:
            timestamp = Metadata(Timestamp(version=1))
        timestamp.signed.snapshot_meta = MetaFile(version=snapshot_version)
        timestamp.signed.expires = _expiry("timestamp", now)
        self._store(session, self._sign(timestamp, "timestamp"), "timestamp")

    def _latest_rows(self, session: Session) -> list[TufMetadata]:
        """The newest published row of targets and every delegated role."""
        rows: dict[str, TufMetadata] = {}
        statement = select(TufMetadata).where(col(TufMetadata.published).is_(True))
        for row in session.exec(statement):
            if row.role in ("root", "snapshot", "timestamp"):
                continue
            if row.role not in rows or rows[row.role].version < row.version:
                rows[row.role] = row
        return list(rows.values())

    def publish_low(self, targets: dict[str, TargetFile]) -> Published:
        """List `targets` in the `low` role (new version, online key), then a new snapshot and timestamp."""
        with self._lock, Session(self._engine) as session:
            now = self._clock()

            def add(signed: Signed) -> None:
                assert isinstance(signed, Targets)
                signed.targets.update(targets)

            low = self._bump(session, LOW_ROLE, add, now)
            self._store(session, low, LOW_ROLE)
            self._snapshot_and_timestamp(session, now)
            self._commit(session)
            return Published(LOW_ROLE, low.signed.version)

    def prepare_high(self, role: str, targets: dict[str, TargetFile]) -> Metadata:
        """The unpublished metadata of a high-risk role (approvers sign exactly these bytes); kept if it exists."""
        with self._lock, Session(self._engine) as session:
            existing = self._row(session, role, published=False)
            if existing is not None:
                return Metadata.from_bytes(existing.data.encode())
            version = 1 + (self._row(session, role).version if self._row(session, role) else 0)  # type: ignore[union-attr]
            md = Metadata(Targets(version=version, expires=_expiry(role, self._clock()), targets=dict(targets)))
            self._store(session, md, role, published=False)
            self._commit(session)
            return md

    def pending(self, session: Session, role: str) -> TufMetadata:
        """The unpublished metadata row of a high-risk role; `NotFoundError` if none awaits approval."""
        statement = select(TufMetadata).where(TufMetadata.role == role, col(TufMetadata.published).is_(False))
        row = session.exec(statement.order_by(col(TufMetadata.version).desc())).first()
        if row is None:
            raise NotFoundError(f"nothing of role {role} awaits approval")
        return row

    def discard_pending(self, role: str) -> None:
        """Drop the unpublished metadata of `role` (its content changed; approvers sign the new one)."""
        with self._lock, Session(self._engine) as session:
            for row in session.exec(
                select(TufMetadata).where(TufMetadata.role == role, col(TufMetadata.published).is_(False))
            ):
                session.delete(row)
            session.execute(delete(ApprovalSignature).where(col(ApprovalSignature.role) == role))
            self._commit(session)

    def add_signature(self, role: str, keyid: str, signature: str, *, actor: str = "system") -> tuple[int, bool]:
        """Add an approver's signature to the pending role; `(valid signatures, published now)`.

        Only keys of the root's approvers count, each once, and only a signature over the stored bytes verifies.
        """
        with self._lock, Session(self._engine) as session:
            row = self.pending(session, role)
            md = Metadata.from_bytes(row.data.encode())
            policy = self.policy(session)
            root = self.root(session)
            if keyid not in policy.approver_keyids:
                raise InvalidInputError(f"key {keyid[:16]}… is not one of the fleet's approvers", field="keyid")
            sig = Signature(keyid, signature)
            try:
                root.keys[keyid].verify_signature(sig, md.signed_bytes)
            except Exception as exc:  # securesystemslib raises UnverifiedSignatureError (and others for junk)
                raise InvalidInputError(
                    f"the signature does not verify over {role} version {row.version}: {exc}"
                ) from exc
            signed_keys = {_key_value(root.keys[k]) for k in md.signatures if k in root.keys}
            if keyid in md.signatures or _key_value(root.keys[keyid]) in signed_keys:
                raise ConflictError(f"this approver signed {role} version {row.version} already; it counts once")
            md.signatures[keyid] = sig
            approver = session.exec(select(Approver).where(Approver.keyid == keyid)).first()
            session.add(
                ApprovalSignature(
                    role=role,
                    version=row.version,
                    keyid=keyid,
                    signature=signature,
                    approver=approver.name if approver else keyid[:16],
                )
            )
            valid = len({_key_value(root.keys[k]) for k in md.signatures if k in policy.approver_keyids})
            row.data = md.to_bytes(_SERIALIZER).decode()
            published = valid >= policy.approval_threshold
            if published:
                self._publish_high(session, row, md)
            session.add(row)
            audit.record(
                session=session,
                actor=actor,
                action="approval.signed",
                subject=role,
                details={
                    "approver": approver.name if approver else None,
                    "keyid": keyid,
                    "version": row.version,
                    "valid": valid,
                    "published": published,
                },
            )
            self._commit(session)
            return valid, published

    def _publish_high(self, session: Session, row: TufMetadata, md: Metadata) -> None:
        row.published = True
        session.add(row)
        session.flush()
        now = self._clock()
        high = self._high_roles(session)
        assert isinstance(md.signed, Targets)
        high[row.role] = sorted({"/".join(path.split("/")[:3]) + "/*" for path in md.signed.targets})

        def delegate(signed: Signed) -> None:
            assert isinstance(signed, Targets)
            signed.delegations = self._delegations(session, high)

        self._store(session, self._bump(session, "targets", delegate, now), "targets")
        self._snapshot_and_timestamp(session, now)

    def update_root(self, root_md: Metadata) -> None:
        """Store a new root version (signed by the old and the new threshold of root keys; the CLI does that)."""
        with self._lock, Session(self._engine) as session:
            current = self.root(session)
            if root_md.signed.version != current.version + 1:
                raise InvalidInputError(f"root version {root_md.signed.version} does not follow {current.version}")
            current.verify_delegate("root", root_md.signed_bytes, root_md.signatures)
            assert isinstance(root_md.signed, Root)
            root_md.signed.verify_delegate("root", root_md.signed_bytes, root_md.signatures)
            self._store(session, root_md, "root")
            now = self._clock()
            # Targets re-delegate with the root's approver set; every role is re-signed with the current online keys.
            high = self._high_roles(session)

            def redelegate(signed: Signed) -> None:
                assert isinstance(signed, Targets)
                signed.delegations = self._delegations(session, high)

            self._store(session, self._bump(session, LOW_ROLE, lambda _s: None, now), LOW_ROLE)
            self._store(session, self._bump(session, "targets", redelegate, now), "targets")
            self._snapshot_and_timestamp(session, now)
            self._commit(session)

    def refresh(self) -> list[str]:
        """Re-sign the online roles whose expiry is less than half their lifetime away; returns what was re-signed."""
        with self._lock, Session(self._engine) as session:
            if self._row(session, "root") is None:
                return []
            now = self._clock()
            due = [r for r in ("targets", LOW_ROLE) if self._due(session, r, now)]
            for role in due:
                self._store(session, self._bump(session, role, lambda _s: None, now), role)
            if due or self._due(session, "snapshot", now):
                self._snapshot_and_timestamp(session, now)
                due.append("snapshot")
            elif self._due(session, "timestamp", now):
                snapshot = self.metadata(session, "snapshot")
                self._timestamp(session, snapshot.signed.version, now)
                due.append("timestamp")
            self._commit(session)
            return due

    def _due(self, session: Session, role: str, now: datetime) -> bool:
        expires = self.metadata(session, role).signed.expires
        return expires - now < EXPIRY[role] / 2

    @staticmethod
    def _commit(session: Session) -> None:
        try:
            session.commit()
        except IntegrityError as exc:  # another coordinator published the same version first
            session.rollback()
            raise ConflictError(f"the image repository changed under this write; try again ({exc.orig})") from exc
