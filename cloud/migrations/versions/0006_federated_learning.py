"""Federated learning: SuperNode identities of devices, federated runs, the trainable form of a version.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30 08:41:29.851339
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the flower_node and federated_run tables and model_version.trainable."""
    op.create_table(
        "federated_run",
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("parent_version", sa.String(length=64), nullable=False),
        sa.Column("selector", sa.JSON(), nullable=False),
        sa.Column("params", sa.JSON(), nullable=False),
        sa.Column("status", sa.String(length=16), nullable=False),
        sa.Column("flower_run_id", sa.String(length=32), nullable=True),
        sa.Column("node_ids", sa.JSON(), nullable=False),
        sa.Column("rounds", sa.JSON(), nullable=False),
        sa.Column("candidate_version", sa.String(length=64), nullable=True),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("error", sa.String(), nullable=True),
        sa.Column("created_by", sa.String(length=128), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("devices", sa.JSON(), nullable=False),
        sa.Column("summary", sa.JSON(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("federated_run", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_federated_run_model_name"), ["model_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_federated_run_status"), ["status"], unique=False)

    op.create_table(
        "flower_node",
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("node_id", sa.String(length=32), nullable=False),
        sa.Column("public_key", sa.String(), nullable=False),
        sa.Column("registered_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("unregistered_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("device_id"),
    )
    with op.batch_alter_table("flower_node", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_flower_node_node_id"), ["node_id"], unique=False)

    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.add_column(sa.Column("trainable", sa.JSON(), nullable=True))


def downgrade() -> None:
    """Undo 0006 (for development databases; operators restore a backup instead)."""
    with op.batch_alter_table("model_version", schema=None) as batch_op:
        batch_op.drop_column("trainable")

    with op.batch_alter_table("flower_node", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_flower_node_node_id"))

    op.drop_table("flower_node")
    with op.batch_alter_table("federated_run", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_federated_run_status"))
        batch_op.drop_index(batch_op.f("ix_federated_run_model_name"))

    op.drop_table("federated_run")
