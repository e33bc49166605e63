"""Governance: model cards, TUF metadata (image repository), approvers and their signatures, audit chain, risk class.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30 02:51:02.455712
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the governance tables and the risk class and signing state of model versions."""

    op.create_table(
        "approval_signature",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("keyid", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=1024), nullable=False),
        sa.Column("approver", sa.String(length=128), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("role", "version", "keyid", name="uq_approval_role_version_key"),
    )
    with op.batch_alter_table("approval_signature", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_approval_signature_role"), ["role"], unique=False)

    op.create_table(
        "approver",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("keyid", sa.String(length=64), nullable=False),
        sa.Column("public_key", sa.JSON(), nullable=False),
        sa.Column("added_by", sa.String(length=128), nullable=False),
        sa.Column("added_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("keyid"),
        sa.UniqueConstraint("name"),
    )
    op.create_table(
        "audit_checkpoint",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.Column("keyid", sa.String(length=64), nullable=False),
        sa.Column("signature", sa.String(length=1024), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("audit_checkpoint", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_checkpoint_seq"), ["seq"], unique=False)

    op.create_table(
        "audit_entry",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("actor", sa.String(length=160), nullable=False),
        sa.Column("action", sa.String(length=64), nullable=False),
        sa.Column("subject", sa.String(length=256), nullable=False),
        sa.Column("details", sa.JSON(), nullable=False),
        sa.Column("prev_hash", sa.String(length=64), nullable=False),
        sa.Column("hash", sa.String(length=64), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("hash"),
        sa.UniqueConstraint("seq"),
    )
    with op.batch_alter_table("audit_entry", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_audit_entry_action"), ["action"], unique=False)

    op.create_table(
        "tuf_metadata",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("role", sa.String(length=200), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("data", sa.Text(), nullable=False),
        sa.Column("published", sa.Boolean(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("role", "version", name="uq_tuf_metadata_role_version"),
    )
    with op.batch_alter_table("tuf_metadata", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_tuf_metadata_role"), ["role"], unique=False)

    op.create_table(
        "model_card",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_version_id", sa.Integer(), nullable=False),
        sa.Column("card", sa.JSON(), nullable=False),
        sa.Column("sha256", sa.String(length=64), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(
            ["model_version_id"],
            ["model_version.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_version_id"),
    )
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(sa.Column("risk_class", sa.String(length=8), server_default="low", nullable=False))
        batch_op.add_column(sa.Column("signing_state", sa.String(length=24), server_default="unsigned", nullable=False))


def downgrade() -> None:
    """Undo 0003 (for development databases; operators restore a backup instead)."""

    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("signing_state")
        batch_op.drop_column("risk_class")

    op.drop_table("model_card")
    with op.batch_alter_table("tuf_metadata", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_tuf_metadata_role"))

    op.drop_table("tuf_metadata")
    with op.batch_alter_table("audit_entry", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_entry_action"))

    op.drop_table("audit_entry")
    with op.batch_alter_table("audit_checkpoint", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_audit_checkpoint_seq"))

    op.drop_table("audit_checkpoint")
    op.drop_table("approver")
    with op.batch_alter_table("approval_signature", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_approval_signature_role"))

    op.drop_table("approval_signature")
