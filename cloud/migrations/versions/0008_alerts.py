"""Alerts: open/resolved alerts per condition and cohort, acknowledgements, webhook deliveries.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30 12:35:00.000000
"""

from collections.abc import Sequence

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing yet (filled in by the work this revision is named after)."""


def downgrade() -> None:
    """Nothing yet."""
