"""Drift monitoring: output semantics and reference profiles of versions, sketches of telemetry windows.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 12:35:00.000000
"""

from collections.abc import Sequence

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Nothing yet (filled in by the work this revision is named after)."""


def downgrade() -> None:
    """Nothing yet."""
