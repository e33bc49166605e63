"""Aliases of a model (`production`, `staging`, ...): a movable name for one of its versions, and their history."""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, when

__all__ = [
    "AliasChange",
    "AliasChangePublic",
    "AliasChangesPublic",
    "ModelAlias",
    "ModelAliasPublic",
    "ModelAliasesPublic",
]


class ModelAlias(SQLModel, table=True):
    """Where alias `alias` of model `model_name` points now; a deployment of `model@alias` resolves through it."""

    __tablename__ = "model_alias"
    __table_args__ = (UniqueConstraint("model_name", "alias", name="uq_model_alias_model_alias"),)

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(foreign_key="model.name", index=True, max_length=128)
    alias: str = Field(max_length=128)
    version: str = Field(max_length=64)
    updated_by: str = Field(default="", max_length=128)
    updated_at: datetime = when()


class AliasChange(SQLModel, table=True):
    """One move of an alias: set (`from_version` null), moved, or deleted (`to_version` null). Never rewritten."""

    __tablename__ = "model_alias_change"

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(index=True, max_length=128)
    alias: str = Field(max_length=128)
    from_version: str | None = Field(default=None, max_length=64)
    to_version: str | None = Field(default=None, max_length=64)
    changed_by: str = Field(default="", max_length=128)
    changed_at: datetime = when()


class ModelAliasPublic(UtcOut):
    """An alias as the API shows it."""

    model: str
    alias: str
    version: str
    updated_by: str
    updated_at: datetime


class ModelAliasesPublic(SQLModel):
    """A model's aliases, by name."""

    data: list[ModelAliasPublic]
    count: int


class AliasChangePublic(UtcOut):
    """One move of an alias: who moved it when, from which version to which (null: set first, or deleted)."""

    model: str
    alias: str
    from_version: str | None
    to_version: str | None
    changed_by: str
    changed_at: datetime


class AliasChangesPublic(SQLModel):
    """A model's alias changes, oldest first."""

    data: list[AliasChangePublic]
    count: int
