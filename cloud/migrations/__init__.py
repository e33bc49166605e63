"""Schema migrations of the coordinator's database (Alembic), configured in code: no alembic.ini at run time.

`cloud.db.upgrade_db(engine)` runs them on the coordinator's own engine; `python -m cloud.migrations revision
-m "..."` writes a new one (see docs/operations.md). Revisions are numbered `0001`, `0002`, ... and live in
`versions/`; `0001` is the schema of release 0.1.0, whose databases were made by `create_all` and are adopted
(stamped) at that revision.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from alembic.autogenerate.api import AutogenContext
from alembic.config import Config
from alembic.script import ScriptDirectory
from sqlalchemy.engine import Connection
from sqlmodel.sql.sqltypes import AutoString

__all__ = [
    "BASELINE",
    "BASELINE_TABLES",
    "SCRIPT_LOCATION",
    "alembic_config",
    "head_revision",
    "known_revisions",
    "next_revision_id",
    "render_item",
]

SCRIPT_LOCATION = Path(__file__).resolve().parent
BASELINE = "0001"
# The tables of release 0.1.0 (revision 0001), fixed here on purpose: later revisions add tables, and a
# database of that release is recognised by these, not by whatever the models hold today.
BASELINE_TABLES = frozenset(
    {
        "deployment",
        "deployment_target",
        "device",
        "device_event",
        "model",
        "model_version",
        "rollout",
        "rollout_command",
        "rollout_decision",
        "rollout_dispatch",
        "telemetry_window",
    }
)


def alembic_config(connection: Connection | None = None) -> Config:
    """An Alembic `Config` for the migrations in this package; `connection` is the one env.py migrates."""
    config = Config()
    # ConfigParser interpolates '%': a path holding one must not be taken for a reference.
    config.set_main_option("script_location", str(SCRIPT_LOCATION).replace("%", "%%"))
    config.set_main_option("file_template", "%%(rev)s_%%(slug)s")
    config.attributes["connection"] = connection
    return config


def _scripts() -> ScriptDirectory:
    return ScriptDirectory.from_config(alembic_config())


def head_revision() -> str:
    """The newest revision this code knows (the schema its models describe)."""
    head = _scripts().get_current_head()
    assert head is not None, "cloud/migrations/versions holds no revision"
    return head


def known_revisions() -> list[str]:
    """Every revision this code knows, oldest first."""
    return [script.revision for script in reversed(list(_scripts().walk_revisions()))]


def next_revision_id() -> str:
    """The id a new revision gets: one more than the highest, four digits (`0002` after `0001`)."""
    return f"{max(int(rev) for rev in known_revisions()) + 1:04d}"


def render_item(type_: str, obj: Any, autogen_context: AutogenContext) -> str | Literal[False]:
    """Autogenerate hook: write SQLModel's `AutoString` as plain `sa.String`, so revisions never import sqlmodel."""
    if type_ == "type" and isinstance(obj, AutoString):
        return f"sa.String(length={obj.length})" if obj.length is not None else "sa.String()"
    return False
