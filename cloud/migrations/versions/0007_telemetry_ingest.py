"""Batched telemetry ingest: rollups per device and time bucket, retention.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 12:35:00.000000
"""

from collections.abc import Sequence

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing yet (filled in by the work this revision is named after)."""


def downgrade() -> None:
    """Nothing yet."""
