"""What every model module shares: timezone-aware timestamps, JSON columns, zone-restoring public shapes."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pydantic import field_validator
from sqlalchemy import JSON, Column, DateTime
from sqlmodel import Field, SQLModel

from protocol.messages import utcnow

__all__ = ["UtcOut", "as_utc", "json_column", "when"]


def as_utc(value: datetime | None) -> datetime | None:
    """A timestamp read back from the database, with its UTC zone restored where SQLite dropped it."""
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def json_column(default: Any) -> Any:
    """A JSON column (not null) with a default factory."""
    return Field(default_factory=default, sa_column=Column(JSON, nullable=False))


def when(*, nullable: bool = False) -> Any:
    """A timezone-aware timestamp column (defaulting to now unless nullable)."""
    column = Column(DateTime(timezone=True), nullable=nullable)
    return Field(default=None, sa_column=column) if nullable else Field(default_factory=utcnow, sa_column=column)


class UtcOut(SQLModel):
    """Public shapes: timestamps always carry their zone."""

    @field_validator("*", mode="after")
    @classmethod
    def _zone(cls, value: Any) -> Any:
        return as_utc(value) if isinstance(value, datetime) else value
