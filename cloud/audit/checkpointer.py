"""Signing the audit chain's head off the request path: a thread checkpoints when one is due, and at stop.

A checkpoint is due after `every_entries` (100) unsigned entries, or once the oldest unsigned entry has waited
`every_s` (60 s): at most every minute while actions arrive, never while none do. Each checkpoint is also kept
in `data_dir/audit-head.json`, so that deleting the newest entries together with their checkpoint rows still
shows as truncation.
"""

from __future__ import annotations

import logging
import threading
from datetime import UTC, datetime
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from sqlalchemy.engine import Engine
from sqlmodel import Session

from cloud.audit.chain import AuditReport, checkpoint_due
from cloud.audit.service import checkpoint, signed_head, unsigned_entries, verify, write_head_file
from cloud.leases import Leases
from cloud.models import AuditCheckpoint
from cloud.periodic import Periodic
from protocol.messages import utcnow

__all__ = ["CHECKPOINT_EVERY_ENTRIES", "CHECKPOINT_EVERY_S", "AuditCheckpointer"]

CHECKPOINT_EVERY_ENTRIES = 100
CHECKPOINT_EVERY_S = 60.0
_TICK_S = 5.0

log = logging.getLogger(__name__)


class AuditCheckpointer:
    """The coordinator's audit key at work: checkpoints when due (`start()`), on demand, and at `stop()`."""

    def __init__(
        self,
        *,
        engine: Engine,
        key: Ed25519PrivateKey,
        head_file: Path,
        every_entries: int = CHECKPOINT_EVERY_ENTRIES,
        every_s: float = CHECKPOINT_EVERY_S,
        tick_s: float = _TICK_S,
        leases: Leases | None = None,
    ) -> None:
        """`leases`: replicas of one coordinator checkpoint in the replica holding the job's lease, one at a time."""
        self.engine = engine
        self.key = key
        self.head_file = head_file
        self.every_entries = every_entries
        self.every_s = every_s
        self.tick_s = tick_s
        self._lock = threading.Lock()  # one checkpoint (row + head file) at a time
        self._periodic = Periodic("audit-checkpointer", self.tick, tick_s, lease=leases)

    @property
    def public_key(self) -> Ed25519PublicKey:
        """What verifies this coordinator's checkpoints."""
        return self.key.public_key()

    def checkpoint(self) -> AuditCheckpoint | None:
        """Sign the committed head now and keep it in the head file; None for an empty log."""
        with self._lock, Session(self.engine, expire_on_commit=False) as session:
            row = checkpoint(session=session, key=self.key)
            if row is not None:
                write_head_file(self.head_file, signed_head(row))
        return row

    def verify(self) -> AuditReport:
        """The whole chain checked against this key's checkpoints and the head file."""
        with Session(self.engine) as session:
            return verify(session=session, public_key=self.public_key, head_file=self.head_file)

    def due(self, now: datetime | None = None) -> bool:
        """Whether enough entries, or an old enough one, wait for a checkpoint."""
        with Session(self.engine) as session:
            unsigned, oldest = unsigned_entries(session=session, public_key=self.public_key)
        return checkpoint_due(
            unsigned=unsigned,
            oldest_unsigned_at=oldest,
            now=now or utcnow(),
            every_entries=self.every_entries,
            every_s=self.every_s,
        )

    def tick(self, now: datetime | None = None) -> AuditCheckpoint | None:
        """Checkpoint if one is due; the new checkpoint, else None."""
        return self.checkpoint() if self.due(now) else None

    def start(self) -> None:
        """Checkpoint in a background thread whenever one is due."""
        self._periodic.start()

    def stop(self) -> None:
        """Stop the thread, then sign whatever is still unsigned (the head file then holds the final head)."""
        self._periodic.stop()
        # Any unsigned entry is due now (under the lease: a replica stopping while another one checkpoints leaves
        # the signing to that one).
        self._periodic.run_guarded(self._periodic.leased(lambda: self.tick(_FAR_FUTURE)))


_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)
