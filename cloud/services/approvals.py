"""The deploy policy of signed-artifact governance: which versions may be deployed, and what a high-risk one lacks.

A low-risk version may be deployed once the coordinator's online key has signed it (`signing_state` "signed").
A high-risk one also needs `threshold` approvals: signatures over its role's metadata (`high_role`) by distinct
approvers whose keys are not revoked. Approvals are counted afresh on every check, so revoking an approver takes
their signatures out of every count at once. `judge` decides from plain data; the functions around it read the
database. `high_role(name, version)` (the role's name, "high:{name}:{version}") lives in `protocol.governance`,
where devices read it too, and is re-exported here.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from pydantic import BaseModel, Field
from sqlalchemy import func
from sqlmodel import Session, col, select

from cloud.errors import ConflictError
from cloud.models import ApprovalSignature, Approver, ModelCard, ModelVersion, TufMetadata
from protocol.governance import high_role

__all__ = [
    "ApprovalStatus",
    "ApprovalsPublic",
    "Facts",
    "approval_status",
    "ensure_deployable",
    "high_role",
    "judge",
    "list_approvals",
]


class ApprovalStatus(BaseModel):
    """Where a version stands: the approvals it needs, who signed, who could still sign, and whether it may deploy."""

    name: str
    version: str
    risk_class: str
    signing_state: str
    role: str | None = Field(description="The metadata role approvers sign (high-risk versions only).")
    required: int = Field(description="Approvals needed (0 for a low-risk version).")
    signed_by: list[str] = Field(description="Approvers whose signatures count (not revoked), by name.")
    missing: list[str] = Field(description="Approvers (not revoked) who have not signed yet, by name.")
    deployable: bool
    reason: str | None = Field(description="Why it may not be deployed (None when it may).")
    has_card: bool = Field(default=False, description="Whether the version has a model card (GET .../card).")


class ApprovalsPublic(BaseModel):
    """A listing of approval statuses."""

    data: list[ApprovalStatus]
    count: int


@dataclass(frozen=True)
class Facts:
    """What the policy looks at for one version (read from the database by the functions below)."""

    name: str
    version: str
    risk_class: str
    signing_state: str
    has_card: bool
    signed_by: Sequence[str]  # approvers (not revoked) with a counted signature, sorted
    approvers: Sequence[str]  # every approver not revoked, sorted


def judge(facts: Facts, threshold: int) -> ApprovalStatus:
    """The approval status of one version under `threshold` (pure: no IO)."""
    high = facts.risk_class == "high"
    required = threshold if high else 0
    signed = list(facts.signed_by) if high else []
    missing = [a for a in facts.approvers if a not in set(signed)] if high else []
    reason = _refusal(facts, required, signed, missing)
    return ApprovalStatus(
        name=facts.name,
        version=facts.version,
        risk_class=facts.risk_class,
        signing_state=facts.signing_state,
        role=high_role(facts.name, facts.version) if high else None,
        required=required,
        signed_by=signed,
        missing=missing,
        deployable=reason is None,
        reason=reason,
        has_card=facts.has_card,
    )


def _refusal(facts: Facts, required: int, signed: list[str], missing: list[str]) -> str | None:
    """Why the version may not be deployed, or None when it may (the messages of `ensure_deployable`)."""
    ref = f"{facts.name}:{facts.version}"
    state = facts.signing_state
    short = len(signed) < required
    if state == "signed" and not short:
        return None
    if state == "unsigned":
        if facts.risk_class == "high" and not facts.has_card:
            why = f"no model card for a high-risk version (add one: `edgefleet models card {ref} --file card.json`)"
        else:
            why = "the governance signer has not signed it (signing failed or is pending; see the coordinator's log)"
        return f"{ref} is not signed yet: {why}"
    if state not in {"awaiting_approval", "signed"}:
        return f"{ref} has signing state {state!r}; only signed versions may be deployed"
    if not short:  # awaiting approval with enough approvals: the signer has not published the metadata yet
        return (
            f"{ref} has the {required} approvals it needs but is not signed yet (the signer publishes its "
            "metadata once the approvals are complete)"
        )
    return _short_of_approvals(ref, state, required, signed, missing)


def _short_of_approvals(ref: str, state: str, required: int, signed: list[str], missing: list[str]) -> str:
    """'digits:2.0 is high risk and needs 2 approvals; it has 1 (alice); missing 1 more of: bob, carol'."""
    has = f"{len(signed)} ({', '.join(signed)})" if signed else "0"
    lacking = required - len(signed)
    text = f"{ref} is high risk and needs {required} approvals; it has {has}; missing {lacking} more"
    if missing:
        text += f" of: {', '.join(missing)}"
    if len(missing) < lacking:
        n = len(missing)
        can = f"only {n} approver{'s' if n > 1 else ''} can still approve" if n else "no approver is left to approve"
        text += f" ({can}: add approvers with `edgefleet keys add-approver`)"
    if state == "signed":  # signed once; since then approvers were revoked or the threshold was raised
        text += " (it was signed before approvers were revoked or the threshold was raised)"
    return text


def ensure_deployable(*, session: Session, record: ModelVersion, threshold: int) -> None:
    """Refuse (`ConflictError`, HTTP 409) a version that may not be deployed, naming what is missing.

    e.g. "digits:2.0 is high risk and needs 2 approvals; it has 1 (alice); missing 1 more of: bob, carol", or
    "digits:2.0 is not signed yet: no model card for a high-risk version (...)".
    """
    status = approval_status(session=session, record=record, threshold=threshold)
    if not status.deployable:
        raise ConflictError(status.reason or f"{record.name}:{record.version} may not be deployed")


def approval_status(*, session: Session, record: ModelVersion, threshold: int) -> ApprovalStatus:
    """The approval status of one version."""
    return _statuses(session, [record], threshold)[0]


def list_approvals(*, session: Session, threshold: int) -> list[ApprovalStatus]:
    """Every high-risk version not signed yet, oldest first, with its approval status."""
    statement = (
        select(ModelVersion)
        .where(ModelVersion.risk_class == "high", ModelVersion.signing_state != "signed")
        .order_by(col(ModelVersion.id))
    )
    return _statuses(session, list(session.exec(statement)), threshold)


def _statuses(session: Session, records: list[ModelVersion], threshold: int) -> list[ApprovalStatus]:
    """Statuses of `records`, reading approvers, signatures and cards once for all of them."""
    if not records:
        return []
    approvers = {a.keyid: a.name for a in session.exec(select(Approver).where(col(Approver.revoked_at).is_(None)))}
    roles = [high_role(r.name, r.version) for r in records]
    signers = _signers(session, roles, approvers)
    ids = [r.id for r in records]
    with_card = set(session.exec(select(ModelCard.model_version_id).where(col(ModelCard.model_version_id).in_(ids))))
    names = sorted(approvers.values())
    return [
        judge(
            Facts(
                name=r.name,
                version=r.version,
                risk_class=r.risk_class,
                signing_state=r.signing_state,
                has_card=r.id in with_card,
                signed_by=sorted(signers.get(role, set())),
                approvers=names,
            ),
            threshold,
        )
        for r, role in zip(records, roles, strict=True)
    ]


def _signers(session: Session, roles: Iterable[str], approvers: dict[str, str]) -> dict[str, set[str]]:
    """Per role, the names of approvers (not revoked) whose signature counts: one per approver.

    Where the role has metadata, only signatures over its latest version count (an older version is other
    signed bytes); without metadata (not produced yet) every signature of the role is considered.
    """
    roles = list(roles)
    latest = dict(
        session.exec(
            select(TufMetadata.role, func.max(TufMetadata.version))
            .where(col(TufMetadata.role).in_(roles))
            .group_by(col(TufMetadata.role))
        ).all()
    )
    rows = session.exec(
        select(ApprovalSignature.role, ApprovalSignature.version, ApprovalSignature.keyid).where(
            col(ApprovalSignature.role).in_(roles)
        )
    )
    signers: dict[str, set[str]] = {}
    for role, version, keyid in rows:
        if keyid in approvers and (role not in latest or version == latest[role]):
            signers.setdefault(role, set()).add(approvers[keyid])
    return signers
