"""Leases: which coordinator replica steps a rollout or runs a periodic job, until when (`cloud.leases`).

Revision ID: 0012
Revises: 0011
Create Date: 2026-12-10 10:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012"
down_revision: str | None = "0011"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the lease table."""
    op.create_table(
        "lease",
        sa.Column("name", sa.String(length=160), nullable=False),
        sa.Column("holder", sa.String(length=160), nullable=False),
        sa.Column("acquired_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("renewed_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("name"),
    )


def downgrade() -> None:
    """Undo 0012 (for development databases; operators restore a backup instead)."""
    op.drop_table("lease")
