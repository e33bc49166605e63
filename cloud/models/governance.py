"""Governance: model cards, the TUF image repository's metadata, approvers and their signatures, the audit chain."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import BigInteger, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, json_column, when

__all__ = [
    "ApprovalSignature",
    "Approver",
    "AuditCheckpoint",
    "AuditEntry",
    "AuditEntryPublic",
    "ModelCard",
    "TufMetadata",
]


class ModelCard(SQLModel, table=True):
    """The model card of one version (intended use, data provenance, metrics, limitations, risk, owner)."""

    __tablename__ = "model_card"

    id: int | None = Field(default=None, primary_key=True)
    model_version_id: int = Field(foreign_key="model_version.id", unique=True)
    card: dict[str, Any] = json_column(dict)
    sha256: str = Field(max_length=64)  # of the card's canonical JSON; goes into the signed target metadata
    updated_by: str = Field(default="", max_length=128)
    updated_at: datetime = when()


class TufMetadata(SQLModel, table=True):
    """One version of one role's TUF metadata (the whole signed JSON). Unpublished: awaiting approvers' signatures."""

    __tablename__ = "tuf_metadata"
    __table_args__ = (UniqueConstraint("role", "version", name="uq_tuf_metadata_role_version"),)

    id: int | None = Field(default=None, primary_key=True)
    role: str = Field(index=True, max_length=200)
    version: int
    data: str = Field(sa_column=Column(Text, nullable=False))
    published: bool = True
    created_at: datetime = when()


class Approver(SQLModel, table=True):
    """A person whose key may approve high-risk models (the fleet's root metadata lists the same keys)."""

    __tablename__ = "approver"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    keyid: str = Field(unique=True, max_length=64)
    public_key: dict[str, Any] = json_column(dict)  # the TUF key dict: keytype, scheme, keyval
    added_by: str = Field(default="", max_length=128)
    added_at: datetime = when()
    revoked_at: datetime | None = when(nullable=True)


class ApprovalSignature(SQLModel, table=True):
    """An approver's signature over one version of a high-risk role's metadata."""

    __tablename__ = "approval_signature"
    __table_args__ = (UniqueConstraint("role", "version", "keyid", name="uq_approval_role_version_key"),)

    id: int | None = Field(default=None, primary_key=True)
    role: str = Field(index=True, max_length=200)
    version: int
    keyid: str = Field(max_length=64)
    signature: str = Field(max_length=1024)
    approver: str = Field(default="", max_length=128)
    at: datetime = when()


class AuditEntry(SQLModel, table=True):
    """One action in the tamper-evident audit chain: `hash` covers the entry and the previous entry's hash."""

    __tablename__ = "audit_entry"

    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, unique=True, nullable=False))
    at: datetime = when()
    actor: str = Field(max_length=160)
    action: str = Field(index=True, max_length=64)
    subject: str = Field(default="", max_length=256)
    details: dict[str, Any] = json_column(dict)
    prev_hash: str = Field(max_length=64)
    hash: str = Field(unique=True, max_length=64)


class AuditCheckpoint(SQLModel, table=True):
    """A signature over the chain's head at `seq` (made with the coordinator's audit key)."""

    __tablename__ = "audit_checkpoint"

    id: int | None = Field(default=None, primary_key=True)
    seq: int = Field(sa_column=Column(BigInteger, index=True, nullable=False))
    hash: str = Field(max_length=64)
    keyid: str = Field(max_length=64)
    signature: str = Field(max_length=1024)
    at: datetime = when()


class AuditEntryPublic(UtcOut):
    """An audit entry as the API shows it."""

    seq: int
    at: datetime
    actor: str
    action: str
    subject: str
    details: dict[str, Any]
    prev_hash: str
    hash: str
