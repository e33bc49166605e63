"""The model registry: push, list and look up model versions; artifacts go to the content-addressed store."""

from __future__ import annotations

import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO
from urllib.parse import urlencode

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cloud import audit
from cloud.artifacts import ArtifactStore
from cloud.auth import artifact_token
from cloud.errors import ConflictError, InvalidInputError, InvalidModelError, NotFoundError
from cloud.models import Model, ModelCard, ModelPublic, ModelVersion, ModelVersionPublic, VersionLineage
from cloud.variant_policy import Variant
from protocol.errors import TensorSpecError
from protocol.messages import ModelFormat, TensorSpec, utcnow
from protocol.outputs import OutputSemantics, infer_output_semantics
from protocol.profiles import ReferenceProfile, profile_digest
from protocol.tensors import onnx_tensor_specs

__all__ = [
    "MAX_TRAINABLE_BYTES",
    "TRAINABLE_FORMAT",
    "ArtifactLinks",
    "artifact_url",
    "declared_tensors",
    "discard_unreferenced",
    "get_model",
    "get_model_version",
    "lineage",
    "list_models",
    "model_public",
    "push_model_version",
    "reference_profile",
    "set_trainable",
    "trainable_path",
    "version_cards",
    "version_public",
]


def artifact_url(public_url: str, sha256: str) -> str:
    """Where the artifact with this digest is served (readers with a viewer token fetch it here)."""
    return f"{public_url.rstrip('/')}/api/v1/artifacts/{sha256}"


@dataclass(frozen=True)
class ArtifactLinks:
    """Builds the per-device download URLs devices are sent (an HMAC bound to device and digest)."""

    public_url: str
    secret: bytes
    # Signs the director's instruction for (device id, generation, version, variant); None: ungoverned (tests).
    instruct: Callable[[str, int, ModelVersion, Variant], str] | None = None

    def for_device(self, device_id: str, sha256: str) -> str:
        """The URL `device_id` downloads artifact `sha256` from, with its download token."""
        query = urlencode({"device": device_id, "token": artifact_token(self.secret, device_id, sha256)})
        return f"{artifact_url(self.public_url, sha256)}?{query}"


def push_model_version(
    *,
    session: Session,
    store: ArtifactStore,
    name: str,
    version: str,
    stream: BinaryIO,
    format: ModelFormat = ModelFormat.ONNX,
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    primary_variant: str = "default",
    risk_class: str = "low",
    actor: str = "system",
    compression_report: dict[str, Any] | None = None,
    output_semantics: OutputSemantics | None = None,
    profile: ReferenceProfile | None = None,
) -> ModelVersion:
    """Store an artifact and register it as `name:version` (`risk_class` decides how it gets signed), pushed by
    `actor`, with the `edgefleet compress` report its variants come from when given.

    Without explicit `inputs`, an ONNX file's tensors are read from its graph, and a file that does not
    parse is refused (`InvalidModelError`). With explicit `inputs` the bytes are stored as they are, so a
    device's own validation can be exercised. The same name and version twice is a `ConflictError`.

    How the outputs read is `output_semantics` when declared, else the profile's, else inferred from the graph;
    `profile` is the reference profile drift is measured against (stored with its digest, which gets signed).
    """
    if _find_version(session, name, version) is not None:
        raise ConflictError(f"model {name}:{version} exists already; versions are immutable, push a new version")
    sha256, size = store.put(stream)
    inputs, outputs = declared_tensors(
        session=session, store=store, sha256=sha256, size=size, format=format, inputs=inputs, outputs=outputs
    )
    try:
        semantics = _semantics(output_semantics, profile, outputs)
    except InvalidInputError:
        discard_unreferenced(session, store, sha256)
        raise
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        model = Model(name=name, created_at=utcnow())
        session.add(model)
        session.flush()
    assert model.id is not None
    record = ModelVersion(
        model_id=model.id,
        name=name,
        version=version,
        sha256=sha256,
        size=size,
        format=format.value,
        inputs=[spec.model_dump(mode="json") for spec in inputs],
        outputs=[spec.model_dump(mode="json") for spec in outputs],
        primary_variant=primary_variant,
        risk_class=risk_class,
        created_by=actor,
        compression_report=compression_report,
        output_semantics=semantics,
        reference_profile=profile.model_dump(mode="json") if profile is not None else None,
        profile_sha256=profile_digest(profile) if profile is not None else None,
    )
    session.add(record)
    details = {"sha256": sha256, "size": size, "format": format.value, "risk_class": risk_class}
    audit.record(session=session, actor=actor, action="model.pushed", subject=f"{name}:{version}", details=details)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent push of the same name:version won the race
        session.rollback()
        raise ConflictError(f"model {name}:{version} exists already") from exc
    session.refresh(record)
    return record


def _semantics(
    declared: OutputSemantics | None, profile: ReferenceProfile | None, outputs: list[TensorSpec]
) -> dict[str, Any]:
    """How a version's outputs read: declared, else as its reference profile read them, else from the graph."""
    if declared is not None and profile is not None and declared != profile.semantics:
        raise InvalidInputError(
            "the declared output semantics differ from those the reference profile was built with",
            field="output_semantics",
        )
    chosen = declared or (profile.semantics if profile is not None else infer_output_semantics(outputs))
    missing = chosen.missing_from(outputs) if outputs else []
    if missing:
        raise InvalidInputError(
            f"output semantics name {missing[0]!r}, which is not an output of the model "
            f"{sorted(spec.name for spec in outputs)}",
            field="output_semantics",
        )
    return chosen.model_dump(mode="json")


def declared_tensors(
    *,
    session: Session,
    store: ArtifactStore,
    sha256: str,
    size: int,
    format: ModelFormat,
    inputs: list[TensorSpec] | None,
    outputs: list[TensorSpec] | None,
) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """The tensors of an artifact just stored: as given, else read from its ONNX graph.

    An empty file, a non-ONNX file without `inputs`, or a file that does not parse as ONNX is refused
    (`InvalidInputError`) and its bytes are discarded unless a registered version or variant shares them.
    """
    try:
        if size == 0:
            raise InvalidInputError("the uploaded file is empty", field="file")
        if inputs is None:
            if format is not ModelFormat.ONNX:
                raise InvalidInputError(f"inputs are required for format {format.value}", field="inputs")
            try:
                inputs, derived_outputs = onnx_tensor_specs(store.path(sha256))
            except TensorSpecError as exc:
                raise InvalidModelError(str(exc), field="file") from exc
            outputs = derived_outputs if outputs is None else outputs
    except InvalidInputError:
        discard_unreferenced(session, store, sha256)
        raise
    return inputs, outputs or []


def reference_profile(*, session: Session, name: str, version: str) -> ReferenceProfile:
    """The reference profile of `name:version`; `NotFoundError` when the version or its profile is missing."""
    record = _find_version(session, name, version)
    if record is None:
        raise NotFoundError(f"model {name}:{version} not found")
    if record.reference_profile is None:
        raise NotFoundError(
            f"model {name}:{version} has no reference profile; push one with the version "
            "(`edgefleet models push --profile reference_profile.json`, or --variants DIR from `edgefleet compress`)"
        )
    return ReferenceProfile.model_validate(record.reference_profile)


def _find_version(session: Session, name: str, version: str) -> ModelVersion | None:
    statement = select(ModelVersion).where(ModelVersion.name == name, ModelVersion.version == version)
    return session.exec(statement).first()


def discard_unreferenced(session: Session, store: ArtifactStore, sha256: str) -> None:
    """Remove a rejected upload unless a registered version, variant or trainable form shares its bytes."""
    if session.exec(select(ModelVersion.id).where(ModelVersion.sha256 == sha256)).first() is not None:
        return
    if any(v.get("sha256") == sha256 for extras in session.exec(select(ModelVersion.variants)) for v in extras):
        return
    if any((form or {}).get("sha256") == sha256 for form in session.exec(select(ModelVersion.trainable))):
        return
    store.delete(sha256)


# -- the trainable form of a version (federated retraining starts from it) ----------------------------------

TRAINABLE_FORMAT = "torch.export"
# Larger than a Flower App may carry (10 MB, checked when a run is created), so that a big model can still keep
# its trainable form with its version; bodies are held in memory, hence a limit of its own.
MAX_TRAINABLE_BYTES = 256 * 1024 * 1024
# Members of the archive `torch.export.save` writes: `<name>/archive_format` (torch >= 2.6), and
# `serialized_exported_program.json` in the layout of older releases.
_PT2_MARKERS = frozenset({"archive_format", "serialized_exported_program.json"})


def _check_program(path: Path) -> None:
    """`InvalidModelError` unless `path` looks like a `torch.export` program (.pt2: a zip archive of its own)."""
    hint = "export it with torch.export.save (or let `edgefleet compress` write trainable.pt2)"
    if not zipfile.is_zipfile(path):
        raise InvalidModelError(f"the trainable form is not a torch.export program (.pt2 zip archive): {hint}")
    try:
        with zipfile.ZipFile(path) as archive:
            names = {PurePosixPath(member).name for member in archive.namelist()}
    except (zipfile.BadZipFile, OSError) as exc:
        raise InvalidModelError(f"the trainable form is a damaged zip archive ({exc}): {hint}") from exc
    if not names & _PT2_MARKERS:
        raise InvalidModelError(f"the trainable form is a zip archive but not a torch.export program: {hint}")


def set_trainable(
    *, session: Session, store: ArtifactStore, name: str, version: str, stream: BinaryIO, actor: str
) -> ModelVersion:
    """Store the trainable form (a `torch.export` program) of `name:version`, audited as `actor`.

    Like the rest of a version it never changes: the same bytes again are accepted as they are, other bytes are a
    `ConflictError`. Bytes that are not a .pt2 archive are refused (`InvalidModelError`) and not kept.
    """
    record = get_model_version(session=session, name=name, version=version)
    sha256, size = store.put(stream)
    current = record.trainable or {}
    try:
        if size == 0:
            raise InvalidInputError("the trainable form is empty", field="file")
        _check_program(store.path(sha256))
        if current and current.get("sha256") != sha256:
            raise ConflictError(
                f"version {name}:{version} has a trainable form already (sha256 {current.get('sha256')}); versions "
                "are immutable: push a new version"
            )
    except (InvalidInputError, ConflictError):
        discard_unreferenced(session, store, sha256)
        raise
    if current:
        return record
    record.trainable = {"sha256": sha256, "size": size, "format": TRAINABLE_FORMAT}
    session.add(record)
    details = {"sha256": sha256, "size": size, "format": TRAINABLE_FORMAT}
    audit.record(
        session=session, actor=actor, action="model.trainable_set", subject=f"{name}:{version}", details=details
    )
    session.commit()
    session.refresh(record)
    return record


def trainable_path(*, session: Session, store: ArtifactStore, name: str, version: str) -> Path:
    """Where the trainable form of `name:version` is stored; `NotFoundError` when it has none."""
    record = get_model_version(session=session, name=name, version=version)
    if not record.trainable:
        raise NotFoundError(
            f"version {name}:{version} has no trainable form (push one with `edgefleet models push --trainable`)"
        )
    return store.path(str(record.trainable["sha256"]))


def get_model_version(*, session: Session, name: str, version: str) -> ModelVersion:
    """One version; `NotFoundError` names what is missing."""
    record = _find_version(session, name, version)
    if record is None:
        if session.exec(select(Model).where(Model.name == name)).first() is None:
            raise NotFoundError(f"model {name!r} does not exist")
        raise NotFoundError(f"model {name!r} has no version {version!r}")
    return record


def get_model(*, session: Session, name: str) -> tuple[Model, list[ModelVersion]]:
    """A model and its versions (oldest first); `NotFoundError` if unknown."""
    model = session.exec(select(Model).where(Model.name == name)).first()
    if model is None:
        raise NotFoundError(f"model {name!r} does not exist")
    versions = session.exec(
        select(ModelVersion).where(ModelVersion.model_id == model.id).order_by(col(ModelVersion.id))
    )
    return model, list(versions)


def list_models(*, session: Session) -> list[tuple[Model, list[ModelVersion]]]:
    """Every model with its versions, by name."""
    models = list(session.exec(select(Model).order_by(Model.name)))
    versions = list(session.exec(select(ModelVersion).order_by(col(ModelVersion.id))))
    by_model: dict[int | None, list[ModelVersion]] = {}
    for record in versions:
        by_model.setdefault(record.model_id, []).append(record)
    return [(model, by_model.get(model.id, [])) for model in models]


def version_cards(*, session: Session, versions: list[ModelVersion]) -> dict[int, ModelCard]:
    """The model cards of `versions`, by version id (versions without a card are absent)."""
    ids = [v.id for v in versions if v.id is not None]
    if not ids:
        return {}
    return {
        c.model_version_id: c for c in session.exec(select(ModelCard).where(col(ModelCard.model_version_id).in_(ids)))
    }


def lineage(card: ModelCard | None) -> VersionLineage:
    """Where a version comes from, as its card says (`parent_version`, `run`); what the signed targets carry. Pure."""
    extra = dict((card.card or {}).get("extra") or {}) if card is not None else {}
    parent, run = extra.get("parent_version"), extra.get("run")
    return VersionLineage(parent_version=None if parent is None else str(parent), run=None if run is None else str(run))


def version_public(record: ModelVersion, *, public_url: str, card: ModelCard | None = None) -> ModelVersionPublic:
    """The API shape of a version (with its lineage when its card is given)."""
    update = {"artifact_url": artifact_url(public_url, record.sha256), "lineage": lineage(card)}
    return ModelVersionPublic.model_validate(record, update=update)


def model_public(
    model: Model, versions: list[ModelVersion], *, public_url: str, cards: dict[int, ModelCard] | None = None
) -> ModelPublic:
    """The API shape of a model with its versions (their lineage from `cards`, by version id)."""
    cards = cards or {}
    return ModelPublic(
        name=model.name,
        created_at=model.created_at,
        versions=[version_public(v, public_url=public_url, card=cards.get(v.id or 0)) for v in versions],
    )
