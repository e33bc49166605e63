"""Models and their versions (with their variants as JSON)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import JSON, Column, UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, json_column, when

__all__ = [
    "Model",
    "ModelPublic",
    "ModelVersion",
    "ModelVersionBase",
    "ModelVersionPublic",
    "ModelsPublic",
    "VersionLineage",
]


class Model(SQLModel, table=True):
    """A named model; its versions hold the artifacts."""

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(index=True, unique=True, max_length=128)
    created_at: datetime = when()


class ModelVersionBase(SQLModel):
    """What identifies and describes one uploaded version."""

    name: str = Field(index=True, max_length=128)
    version: str = Field(max_length=64)
    sha256: str = Field(index=True, max_length=64)
    size: int
    format: str = Field(max_length=16)
    # Governance (docs/governance.md): `low` versions are signed by the online key after the push's checks;
    # `high` ones need a model card and k approvers. signing_state: unsigned | awaiting_approval | signed.
    risk_class: str = Field(default="low", max_length=8, sa_column_kwargs={"server_default": "low"})
    signing_state: str = Field(default="unsigned", max_length=24, sa_column_kwargs={"server_default": "unsigned"})
    # The token that pushed it (null for versions pushed before 0005 whose push the audit log does not name).
    created_by: str | None = Field(default=None, max_length=128)


class ModelVersion(ModelVersionBase, table=True):
    """One immutable model version; `inputs`/`outputs` are `protocol.TensorSpec` lists as JSON."""

    __tablename__ = "model_version"
    __table_args__ = (UniqueConstraint("name", "version", name="uq_model_version_name_version"),)

    id: int | None = Field(default=None, primary_key=True)
    model_id: int = Field(foreign_key="model.id", index=True)
    inputs: list[dict[str, Any]] = json_column(list)
    outputs: list[dict[str, Any]] = json_column(list)
    # Further artifacts of the same version (quantized ONNX, TFLite, ...): `cloud.variant_policy.Variant`
    # dumps. The version's own artifact above is its primary variant, named by `primary_variant`.
    variants: list[dict[str, Any]] = json_column(list)
    primary_variant: str = Field(default="default", max_length=64)
    # The `edgefleet compress` report (report.json) the variants were measured and gated in; null: none attached.
    compression_report: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # The trainable form kept beside the variants (a torch.export program): {"sha256", "size", "format"}.
    trainable: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # How its outputs read (`protocol.outputs.OutputSemantics`): declared at push, else inferred from the graph.
    output_semantics: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    # The reference profile drift is measured against (`protocol.profiles.ReferenceProfile`) and its digest,
    # which the version's signed targets name.
    reference_profile: dict[str, Any] | None = Field(default=None, sa_column=Column(JSON, nullable=True))
    profile_sha256: str | None = Field(default=None, max_length=64)
    created_at: datetime = when()


class VersionLineage(SQLModel):
    """Where a version comes from: its model card's `parent_version` and `run` (training or compression run)."""

    parent_version: str | None = None
    run: str | None = None


class ModelVersionPublic(ModelVersionBase, UtcOut):
    """A model version as the API shows it, with the URL its artifact is served from."""

    inputs: list[dict[str, Any]]
    outputs: list[dict[str, Any]]
    created_at: datetime
    artifact_url: str = ""
    primary_variant: str = "default"
    variants: list[dict[str, Any]] = []
    compression_report: dict[str, Any] | None = None
    trainable: dict[str, Any] | None = None
    output_semantics: dict[str, Any] | None = None
    profile_sha256: str | None = None
    lineage: VersionLineage = Field(default_factory=VersionLineage)


class ModelPublic(UtcOut):
    """A model with its versions, newest last."""

    name: str
    created_at: datetime
    versions: list[ModelVersionPublic]


class ModelsPublic(SQLModel):
    """A listing of models."""

    data: list[ModelPublic]
    count: int
