"""Batched telemetry ingest: rollups per device and time bucket, retention.

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30 12:35:00.000000

Adds `telemetry_rollup` (sums of stored windows per device, model version and 60-second bucket, the default
`rollup_bucket_s`) filled from the windows already stored, and `telemetry_chain.pruned_seq` (the highest seq
retention deleted).
"""

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_BUCKET_S = 60


def upgrade() -> None:
    """Create `telemetry_rollup`, add `telemetry_chain.pruned_seq`, roll up the stored windows."""
    rollup = op.create_table(
        "telemetry_rollup",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("model_version", sa.String(length=64), nullable=False),
        sa.Column("bucket_start", sa.DateTime(timezone=True), nullable=False),
        sa.Column("windows", sa.BigInteger(), nullable=False),
        sa.Column("inference_count", sa.BigInteger(), nullable=False),
        sa.Column("error_count", sa.BigInteger(), nullable=False),
        sa.Column("latency_histogram", sa.JSON(), nullable=False),
        sa.Column("class_counts", sa.JSON(), nullable=False),
        sa.ForeignKeyConstraint(["device_id"], ["device.id"]),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint(
            "device_id", "model_name", "model_version", "bucket_start", name="uq_telemetry_rollup_bucket"
        ),
    )
    with op.batch_alter_table("telemetry_rollup", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_telemetry_rollup_bucket_start"), ["bucket_start"], unique=False)

    with op.batch_alter_table("telemetry_chain", schema=None) as batch_op:
        batch_op.add_column(sa.Column("pruned_seq", sa.BigInteger(), nullable=True))

    _backfill(rollup)


def _backfill(rollup: sa.Table) -> None:
    """Sum the stored windows into rollups (self-contained: the application's code may change after this)."""
    window = sa.table(
        "telemetry_window",
        sa.column("device_id", sa.String()),
        sa.column("model_name", sa.String()),
        sa.column("model_version", sa.String()),
        sa.column("window_start", sa.DateTime(timezone=True)),
        sa.column("inference_count", sa.Integer()),
        sa.column("error_count", sa.Integer()),
        sa.column("latency_histogram", sa.JSON()),
        sa.column("class_counts", sa.JSON()),
    )
    sums: dict[tuple[str, str, str, datetime], dict[str, Any]] = {}
    for row in op.get_bind().execute(sa.select(window)):
        start = row.window_start if row.window_start.tzinfo else row.window_start.replace(tzinfo=UTC)
        seconds = int(start.timestamp())
        key = (
            row.device_id,
            row.model_name or "",
            row.model_version or "",
            datetime.fromtimestamp(seconds - seconds % _BUCKET_S, UTC),
        )
        total = sums.setdefault(
            key, {"windows": 0, "inference_count": 0, "error_count": 0, "latency_histogram": [], "class_counts": {}}
        )
        total["windows"] += 1
        total["inference_count"] += row.inference_count
        total["error_count"] += row.error_count
        histogram, other = total["latency_histogram"], list(row.latency_histogram or [])
        histogram.extend([0] * (len(other) - len(histogram)))
        total["latency_histogram"] = [value + (other[i] if i < len(other) else 0) for i, value in enumerate(histogram)]
        for name, count in (row.class_counts or {}).items():
            total["class_counts"][name] = total["class_counts"].get(name, 0) + count
    rows = [
        {"device_id": d, "model_name": n, "model_version": v, "bucket_start": b, **total}
        for (d, n, v, b), total in sums.items()
    ]
    if rows:
        op.bulk_insert(rollup, rows)


def downgrade() -> None:
    """Undo 0007 (for development databases; operators restore a backup instead)."""
    with op.batch_alter_table("telemetry_chain", schema=None) as batch_op:
        batch_op.drop_column("pruned_seq")

    with op.batch_alter_table("telemetry_rollup", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_telemetry_rollup_bucket_start"))

    op.drop_table("telemetry_rollup")
