"""Drift monitoring and continuous training: output semantics and reference profiles of versions, CT policies and
their actions.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30 12:35:00.000000
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add model_version.output_semantics, reference_profile and profile_sha256, telemetry_window.sketches, and the
    ct_policy and ct_action tables."""
    with op.batch_alter_table("model_version") as batch:
        batch.add_column(sa.Column("output_semantics", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("reference_profile", sa.JSON(), nullable=True))
        batch.add_column(sa.Column("profile_sha256", sa.String(length=64), nullable=True))
    with op.batch_alter_table("telemetry_window") as batch:
        batch.add_column(sa.Column("sketches", sa.JSON(), nullable=True))
        batch.create_index("ix_telemetry_window_model_end", ["model_name", "model_version", "window_end"], unique=False)
        batch.create_index("ix_telemetry_window_received_at", ["received_at"], unique=False)
    op.create_table(
        "ct_policy",
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("trigger", sa.String(length=32), nullable=False),
        sa.Column("by", sa.String(length=64), nullable=False),
        sa.Column("retrain", sa.String(length=16), nullable=False),
        sa.Column("rounds", sa.Integer(), nullable=False),
        sa.Column("strategy", sa.String(length=16), nullable=False),
        sa.Column("min_nodes", sa.Integer(), nullable=False),
        sa.Column("local_epochs", sa.Integer(), nullable=False),
        sa.Column("lr", sa.Float(), nullable=False),
        sa.Column("rollout", sa.String(length=16), nullable=False),
        sa.Column("wait_for", sa.String(length=64), nullable=False),
        sa.Column("cooldown_s", sa.Integer(), nullable=False),
        sa.Column("enabled", sa.Boolean(), nullable=False),
        sa.Column("rollout_plan", sa.JSON(), nullable=True),
        sa.Column("max_accuracy_drop", sa.Float(), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_by", sa.String(length=160), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ct_policy", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ct_policy_model_name"), ["model_name"], unique=True)
    op.create_table(
        "ct_action",
        sa.Column("policy_id", sa.Integer(), nullable=False),
        sa.Column("model_name", sa.String(length=128), nullable=False),
        sa.Column("version", sa.String(length=64), nullable=False),
        sa.Column("cohort", sa.String(length=256), nullable=False),
        sa.Column("alert_id", sa.Integer(), nullable=True),
        sa.Column("status", sa.String(length=32), nullable=False),
        sa.Column("federated_run_id", sa.Integer(), nullable=True),
        sa.Column("candidate_version", sa.String(length=64), nullable=True),
        sa.Column("rollout_id", sa.Integer(), nullable=True),
        sa.Column("detail", sa.String(length=2000), nullable=False),
        sa.Column("approved_by", sa.String(length=160), nullable=True),
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(["policy_id"], ["ct_policy.id"]),
        sa.PrimaryKeyConstraint("id"),
    )
    with op.batch_alter_table("ct_action", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_ct_action_policy_id"), ["policy_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ct_action_model_name"), ["model_name"], unique=False)
        batch_op.create_index(batch_op.f("ix_ct_action_alert_id"), ["alert_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_ct_action_status"), ["status"], unique=False)


def downgrade() -> None:
    """Drop them again."""
    op.drop_table("ct_action")
    op.drop_table("ct_policy")
    with op.batch_alter_table("telemetry_window") as batch:
        batch.drop_index("ix_telemetry_window_received_at")
        batch.drop_index("ix_telemetry_window_model_end")
        batch.drop_column("sketches")
    with op.batch_alter_table("model_version") as batch:
        batch.drop_column("profile_sha256")
        batch.drop_column("reference_profile")
        batch.drop_column("output_semantics")
