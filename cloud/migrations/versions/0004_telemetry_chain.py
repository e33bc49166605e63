"""Telemetry chain: each window's `prev_seq`, per-device settled seq and dropped count, reported gaps.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-01 09:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add `telemetry_window.prev_seq` (null for stored windows: they start no gap) and the chain tables."""
    op.create_table(
        "telemetry_chain",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("settled_seq", sa.BigInteger(), nullable=True),
        sa.Column("dropped_windows", sa.BigInteger(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("device_id"),
    )
    op.create_table(
        "telemetry_gap",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("first_seq", sa.BigInteger(), nullable=False),
        sa.Column("last_seq", sa.BigInteger(), nullable=False),
        sa.Column("detected_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("reported_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("telemetry_gap", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetry_gap_device_id"), ["device_id"], unique=False)

    with op.batch_alter_table("telemetry_window", schema=None) as batch_op:
        batch_op.add_column(sa.Column("prev_seq", sa.BigInteger(), nullable=True))


def downgrade() -> None:
    """Undo 0004 (for development databases; operators restore a backup instead)."""
    with op.batch_alter_table("telemetry_window", schema=None) as batch_op:
        batch_op.drop_column("prev_seq")

    with op.batch_alter_table("telemetry_gap", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_telemetry_gap_device_id"))

    op.drop_table("telemetry_gap")
    op.drop_table("telemetry_chain")
