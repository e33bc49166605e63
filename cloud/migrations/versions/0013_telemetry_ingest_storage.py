"""Telemetry ingest storage: no index duplicating the unique (device_id, seq) prefix; lz4 for sketches (PostgreSQL).

Revision ID: 0013
Revises: 0012
Create Date: 2026-12-11 10:00:00.000000

`ix_telemetry_window_device_id` indexed what `uq_telemetry_device_seq` already serves (its first column: every
lookup by device, and the foreign key's checks, use the unique index): one B-tree fewer to write per window.
On PostgreSQL 14+ built with lz4, a window's sketches and labels (several kB of base64 sketches, stored out of
line) are compressed with lz4 instead of pglz: pglz was most of the server's cost of a window with sketches.
Only new values are compressed so; stored ones stay as they are (both read the same).
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0013"
down_revision: str | None = "0012"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_COMPRESSED = ("sketches", "labels")


def upgrade() -> None:
    """Drop the duplicate index; compress telemetry_window's sketch and label columns with lz4 where possible."""
    op.drop_index("ix_telemetry_window_device_id", table_name="telemetry_window")
    if _lz4_available():
        for column in _COMPRESSED:
            op.execute(f"ALTER TABLE telemetry_window ALTER COLUMN {column} SET COMPRESSION lz4")


def downgrade() -> None:
    """Undo 0013 (for development databases; operators restore a backup instead)."""
    if _lz4_available():
        for column in _COMPRESSED:
            op.execute(f"ALTER TABLE telemetry_window ALTER COLUMN {column} SET COMPRESSION default")
    op.create_index("ix_telemetry_window_device_id", "telemetry_window", ["device_id"], unique=False)


def _lz4_available() -> bool:
    """PostgreSQL whose build offers lz4 as a TOAST compression (14+, configured --with-lz4); never SQLite."""
    bind = op.get_bind()
    if bind.dialect.name != "postgresql":
        return False
    offered = bind.execute(
        sa.text("SELECT enumvals FROM pg_settings WHERE name = 'default_toast_compression'")
    ).scalar_one_or_none()
    return offered is not None and "lz4" in offered
