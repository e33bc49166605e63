"""Registry lifecycle: model aliases and their history, who pushed a version and its compression report, the alias
a deployment named, and decommissioned devices.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30 05:21:50.874610
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


# Who pushed each stored version, as the audit log recorded it (`model.pushed`, subject `name:version`).
_CREATED_BY = sa.text(
    "UPDATE model_version SET created_by = ("
    " SELECT audit_entry.actor FROM audit_entry"
    " WHERE audit_entry.action = 'model.pushed'"
    " AND audit_entry.subject = model_version.name || ':' || model_version.version"
    " ORDER BY audit_entry.seq DESC LIMIT 1)"
)


def upgrade() -> None:
    """Add the alias tables and the new nullable columns; fill `created_by` of stored versions from the audit log."""
    op.create_table(
        "model_alias_change",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("from_version", sa.String(length=64), nullable=True),
        sa.Column("to_version", sa.String(length=64), nullable=True),
        sa.Column("changed_by", sa.String(length=128), nullable=False),
        sa.Column("changed_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("model_alias_change", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_alias_change_model_name"), ["model_name"], unique=False)

    op.create_table(
        "model_alias",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("alias", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("updated_by", sa.String(length=128), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.ForeignKeyConstraint(["model_name"], ["model.name"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_name", "alias", name="uq_model_alias_model_alias"),
    )
    with op.batch_alter_table("model_alias", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_model_alias_model_name"), ["model_name"], unique=False)

    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.add_column(sa.Column("model_alias", sa.String(length=128), nullable=True))

    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("decommissioned_at", sa.DateTime(timezone=True), nullable=True))

    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(sa.Column("created_by", sa.String(length=128), nullable=True))
        batch_op.add_column(sa.Column("compression_report", sa.JSON(), nullable=True))

    op.execute(_CREATED_BY)


def downgrade() -> None:
    """Undo 0005 (for development databases; operators restore a backup instead)."""
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("compression_report")
        batch_op.drop_column("created_by")

    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_column("decommissioned_at")

    with op.batch_alter_table("deployment", schema=None) as batch_op:
        batch_op.drop_column("model_alias")

    with op.batch_alter_table("model_alias", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_alias_model_name"))

    op.drop_table("model_alias")
    with op.batch_alter_table("model_alias_change", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_model_alias_change_model_name"))

    op.drop_table("model_alias_change")
