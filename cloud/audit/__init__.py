"""The tamper-evident audit log: every registry, key, approval, deployment, rollout and enrolment action, chained.

`record(session=..., actor=..., action="model.pushed", subject="digits:1.0", details={...})` appends an entry
in the caller's transaction (the caller commits: the action and its entry land together or not at all). The
action names are listed in docs/governance.md ("Audit log"). `chain` is the pure logic (hashes, verification),
`service` the database side, `keys` the Ed25519 audit key, `checkpointer` the thread that signs the head.
"""

from cloud.audit.chain import GENESIS_HASH, AuditProblem, AuditReport, ProblemKind, entry_hash
from cloud.audit.checkpointer import AuditCheckpointer
from cloud.audit.keys import load_audit_key
from cloud.audit.service import HEAD_FILE, checkpoint, list_entries, record, verify

__all__ = [
    "GENESIS_HASH",
    "HEAD_FILE",
    "AuditCheckpointer",
    "AuditProblem",
    "AuditReport",
    "ProblemKind",
    "checkpoint",
    "entry_hash",
    "list_entries",
    "load_audit_key",
    "record",
    "verify",
]
