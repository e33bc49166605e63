"""Labels fed back per telemetry window, and drift rollups: merged sketches per device, model version and bucket.

Revision ID: 0010
Revises: 0009
Create Date: 2026-11-30 16:00:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010"
down_revision: str | None = "0009"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add telemetry_window.labels and the drift_rollup and drift_rollup_mark tables."""
    with op.batch_alter_table("telemetry_window") as batch:
        batch.add_column(sa.Column("labels", sa.JSON(), nullable=True))
    op.create_table(
        "drift_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("inference_count", sa.BigInteger(), nullable=False),
        sa.Column("unreadable", sa.BigInteger(), nullable=False),
        sa.Column("sketches", sa.JSON(), nullable=True),
        sa.Column("class_counts", sa.JSON(), nullable=False),
        sa.Column("labels", sa.JSON(), nullable=True),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("model_name", "model_version", "bucket_start", "device_id", name="uq_drift_rollup_bucket"),
    )
    with op.batch_alter_table("drift_rollup") as batch:
        batch.create_index(batch.f("ix_drift_rollup_bucket_start"), ["bucket_start"], unique=False)
    op.create_table(
        "drift_rollup_mark",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("window_id", sa.BigInteger(), nullable=False),
        sa.Column("bucket_s", sa.Integer(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )


def downgrade() -> None:
    """Drop them again."""
    op.drop_table("drift_rollup_mark")
    with op.batch_alter_table("drift_rollup") as batch:
        batch.drop_index(batch.f("ix_drift_rollup_bucket_start"))
    op.drop_table("drift_rollup")
    with op.batch_alter_table("telemetry_window") as batch:
        batch.drop_column("labels")
