"""Alert rule overrides: a rule switched off or on, or its thresholds changed, per model or fleet-wide (`*`).

Revision ID: 0011
Revises: 0010
Create Date: 2026-11-30 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011"
down_revision: str | None = "0010"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the alert_rule_override table."""
    op.create_table(
        "alert_rule_override",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("rule", sa.String(length=64), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=True),
        sa.Column("thresholds", sa.JSON(), nullable=False),
        sa.Column("updated_by", sa.String(length=160), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_name", "rule", name="uq_alert_rule_override"),
    )


def downgrade() -> None:
    """Undo 0011 (for development databases; operators restore a backup instead)."""
    op.drop_table("alert_rule_override")
