"""Deployment targets indexed by (device_id, generation): every report and event of a device looks its targets up.

Revision ID: 0014
Revises: 0013
Create Date: 2026-12-11 12:00:00.000000

Without it each reported state and event scanned the whole `deployment_target` table (one row per device and
deployment): a rollout to 10,000 devices made every one of their ~18 update messages read every target.
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0014"
down_revision: str | None = "0013"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the index."""
    op.create_index(
        "ix_deployment_target_device_generation", "deployment_target", ["device_id", "generation"], unique=False
    )


def downgrade() -> None:
    """Undo 0014 (for development databases; operators restore a backup instead)."""
    op.drop_index("ix_deployment_target_device_generation", table_name="deployment_target")
