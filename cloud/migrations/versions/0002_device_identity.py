"""Device identity: enrolment state, certificates, enrolment tokens, bootstrap secrets, API tokens; 64-bit counters.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-30 01:33:48.350290
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    """Add the identity tables and columns; widen generations and telemetry seqs to 64 bits."""
    op.create_table(
        "api_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("role", sa.String(length=16), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_used_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("token_sha256"),
    )
    op.create_table(
        "bootstrap_secret",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("name", sa.String(length=128), nullable=False),
        sa.Column("secret_sha256", sa.String(length=64), nullable=False),
        sa.Column("tags", sa.JSON(), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("uses", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("name"),
        sa.UniqueConstraint("secret_sha256"),
    )
    op.create_table(
        "device_certificate",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("serial", sa.String(length=64), nullable=False),
        sa.Column("public_key_sha256", sa.String(length=64), nullable=False),
        sa.Column("not_after", sa.DateTime(timezone=True), nullable=False),
        sa.Column("issued_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("serial"),
    )
    with op.batch_alter_table("device_certificate", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_device_certificate_device_id"), ["device_id"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_device_certificate_public_key_sha256"), ["public_key_sha256"], unique=False
        )

    op.create_table(
        "enrolment_token",
        sa.Column("id", sa.Integer(), nullable=False),
        sa.Column("token_sha256", sa.String(length=64), nullable=False),
        sa.Column("device_id", sa.String(length=128), nullable=False),
        sa.Column("created_by", sa.String(length=128), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("used_at", sa.DateTime(timezone=True), nullable=True),
        sa.ForeignKeyConstraint(
            ["device_id"],
            ["device.id"],
        ),
        sa.PrimaryKeyConstraint("id"),
        sa.UniqueConstraint("token_sha256"),
    )
    with op.batch_alter_table("enrolment_token", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_enrolment_token_device_id"), ["device_id"], unique=False)

    with op.batch_alter_table("deployment_target", schema=None) as batch_op:
        batch_op.alter_column("generation", existing_type=sa.INTEGER(), type_=sa.BigInteger(), existing_nullable=False)

    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.add_column(sa.Column("anomaly", sa.String(length=512), nullable=True))
        # Devices of 0.1.0 enrolled themselves by speaking; now each needs a certificate: they start pending.
        batch_op.add_column(
            sa.Column("enrolment", sa.String(length=16), nullable=False, server_default=sa.text("'pending'"))
        )
        batch_op.add_column(sa.Column("enrolled_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.add_column(sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True))
        batch_op.alter_column(
            "desired_generation", existing_type=sa.INTEGER(), type_=sa.BigInteger(), existing_nullable=False
        )
        batch_op.alter_column(
            "reported_generation", existing_type=sa.INTEGER(), type_=sa.BigInteger(), existing_nullable=True
        )
        batch_op.create_index(batch_op.f("ix_device_enrolment"), ["enrolment"], unique=False)

    with op.batch_alter_table("device_event", schema=None) as batch_op:
        batch_op.alter_column("generation", existing_type=sa.INTEGER(), type_=sa.BigInteger(), existing_nullable=True)

    with op.batch_alter_table("rollout_dispatch", schema=None) as batch_op:
        batch_op.alter_column("generation", existing_type=sa.INTEGER(), type_=sa.BigInteger(), existing_nullable=False)

    with op.batch_alter_table("telemetry_window", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.INTEGER(), type_=sa.BigInteger(), existing_nullable=False)


def downgrade() -> None:
    """Undo 0002 (for development databases; operators restore a backup instead)."""
    with op.batch_alter_table("telemetry_window", schema=None) as batch_op:
        batch_op.alter_column("seq", existing_type=sa.BigInteger(), type_=sa.INTEGER(), existing_nullable=False)

    with op.batch_alter_table("rollout_dispatch", schema=None) as batch_op:
        batch_op.alter_column("generation", existing_type=sa.BigInteger(), type_=sa.INTEGER(), existing_nullable=False)

    with op.batch_alter_table("device_event", schema=None) as batch_op:
        batch_op.alter_column("generation", existing_type=sa.BigInteger(), type_=sa.INTEGER(), existing_nullable=True)

    with op.batch_alter_table("device", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_enrolment"))
        batch_op.alter_column(
            "reported_generation", existing_type=sa.BigInteger(), type_=sa.INTEGER(), existing_nullable=True
        )
        batch_op.alter_column(
            "desired_generation", existing_type=sa.BigInteger(), type_=sa.INTEGER(), existing_nullable=False
        )
        batch_op.drop_column("revoked_at")
        batch_op.drop_column("enrolled_at")
        batch_op.drop_column("enrolment")
        batch_op.drop_column("anomaly")

    with op.batch_alter_table("deployment_target", schema=None) as batch_op:
        batch_op.alter_column("generation", existing_type=sa.BigInteger(), type_=sa.INTEGER(), existing_nullable=False)

    with op.batch_alter_table("enrolment_token", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_enrolment_token_device_id"))

    op.drop_table("enrolment_token")
    with op.batch_alter_table("device_certificate", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_device_certificate_public_key_sha256"))
        batch_op.drop_index(batch_op.f("ix_device_certificate_device_id"))

    op.drop_table("device_certificate")
    op.drop_table("bootstrap_secret")
    op.drop_table("api_token")
