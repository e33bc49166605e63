"""The base of the engine's plain data: immutable pydantic records that refuse unknown fields."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["Record"]


class Record(BaseModel):
    """Immutable data; unknown fields refused."""

    model_config = ConfigDict(extra="forbid", frozen=True)
