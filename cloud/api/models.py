"""Routes of models: push versions, variants and trainable forms, list and show them, delete a version nothing uses."""

from __future__ import annotations

import io
import json
from dataclasses import asdict
from typing import Annotated, Any, Literal, TypeVar, cast

from fastapi import APIRouter, Body, File, Form, Path, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel, StrictStr, TypeAdapter, ValidationError

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.errors import InvalidInputError, PayloadTooLargeError
from cloud.models import ModelPublic, ModelsPublic, ModelVersionPublic
from cloud.services import registry, removal, variants
from protocol.governance import high_role
from protocol.messages import ModelFormat, Name, TensorSpec, Version
from protocol.outputs import OutputSemantics
from protocol.profiles import ReferenceProfile

__all__ = ["NamePath", "VersionDeleted", "router"]

_WRITE = requires(Role.PUBLISHER)

router = APIRouter(tags=["registry"])

NamePath = Annotated[Name, Path(description="Model name: letters, digits, '.', '_' and '-'.")]
_SPECS = TypeAdapter(list[TensorSpec])
_STRINGS = TypeAdapter(list[StrictStr])
_OBJECT = TypeAdapter(dict[str, Any])
_Model = TypeVar("_Model", bound=BaseModel)


def _json_form(raw: str | None, field: str, adapter: TypeAdapter[Any]) -> Any:
    """Parse a JSON form field with `adapter`; None when absent; `InvalidInputError` names the field."""
    if raw is None or not raw.strip():
        return None
    try:
        return adapter.validate_python(json.loads(raw))
    except json.JSONDecodeError as exc:
        raise InvalidInputError(f"{field}: not JSON ({exc})", field=field) from exc
    except ValidationError as exc:
        first = exc.errors()[0]
        where = "".join(f"[{p}]" for p in first["loc"])
        raise InvalidInputError(f"{field}{where}: {first['msg']}", field=field) from exc


def _tensor_specs(raw: str | None, field: str) -> list[TensorSpec] | None:
    """A JSON list of tensor specs from a form field."""
    return cast("list[TensorSpec] | None", _json_form(raw, field, _SPECS))


def _parsed(model: type[_Model], raw: str | None, field: str) -> _Model | None:
    """A JSON object form field read as `model` (e.g. the reference profile); None when absent."""
    return cast("_Model | None", _json_form(raw, field, TypeAdapter(model)))


def _string_list(raw: str | None, field: str) -> list[str] | None:
    """A JSON list of strings from a form field."""
    return cast("list[str] | None", _json_form(raw, field, _STRINGS))


@router.post(
    "/models/{name}/versions",
    status_code=201,
    dependencies=[_WRITE],
    summary="Push a model version (multipart upload)",
)
def push_model_version(
    name: NamePath,
    version: Annotated[Version, Form(description="Version string, e.g. 1.0.")],
    file: Annotated[UploadFile, File(description="The model file.")],
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    format: Annotated[ModelFormat, Form(description="Model format.")] = ModelFormat.ONNX,
    inputs: Annotated[str | None, Form(description="JSON list of TensorSpec; derived from ONNX if absent.")] = None,
    outputs: Annotated[str | None, Form(description="JSON list of TensorSpec.")] = None,
    variant: Annotated[Name, Form(description="Name of this file as the version's primary variant.")] = "default",
    risk_class: Annotated[
        Literal["low", "high"],
        Form(description="`high`: deployable only after its model card is set and enough approvers signed it."),
    ] = "low",
    report: Annotated[
        str | None, Form(description="JSON object: the `edgefleet compress` report (report.json) of its variants.")
    ] = None,
    output_semantics: Annotated[
        str | None,
        Form(
            description="JSON object (protocol.outputs.OutputSemantics): which output is the class label, the class "
            "probabilities or logits, or a regressor's value; inferred from the graph when absent."
        ),
    ] = None,
    profile: Annotated[
        str | None,
        Form(description="JSON object: the reference profile (reference_profile.json) drift is measured against."),
    ] = None,
) -> ModelVersionPublic:
    """Store the file and register it; the ONNX graph supplies inputs/outputs unless they are given."""
    record = registry.push_model_version(
        session=session,
        store=coordinator.store,
        name=name,
        version=version,
        stream=file.file,
        format=format,
        inputs=_tensor_specs(inputs, "inputs"),
        outputs=_tensor_specs(outputs, "outputs"),
        primary_variant=variant,
        risk_class=risk_class,
        actor=principal.name,
        compression_report=cast("dict[str, Any] | None", _json_form(report, "report", _OBJECT)),
        output_semantics=_parsed(OutputSemantics, output_semantics, "output_semantics"),
        profile=_parsed(ReferenceProfile, profile, "profile"),
    )
    _sign(coordinator)
    session.refresh(record)
    return registry.version_public(record, public_url=coordinator.public_url)


@router.post(
    "/models/{name}/versions/{version}/variants",
    status_code=201,
    dependencies=[_WRITE],
    summary="Add a variant (another artifact) to a model version",
)
def add_variant(
    name: NamePath,
    version: Annotated[Version, Path()],
    variant: Annotated[Name, Form(description="Variant name, e.g. int8-static or tflite-int8.")],
    file: Annotated[UploadFile, File(description="The variant's model file.")],
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    format: Annotated[ModelFormat, Form(description="Model format.")] = ModelFormat.ONNX,
    precision: Annotated[str, Form(max_length=32, description="fp32, fp16, int8, ...")] = "fp32",
    runtime: Annotated[str | None, Form(max_length=64, description="Runtime the variant was built for.")] = None,
    cpu_features: Annotated[
        str | None, Form(description="JSON list of CPU flags that accelerate it (any one suffices).")
    ] = None,
    accuracy: Annotated[float | None, Form(ge=0, le=1, description="Measured accuracy (0..1).")] = None,
    agreement: Annotated[float | None, Form(ge=0, le=1, description="Agreement with fp32 predictions.")] = None,
    latency_p50_ms: Annotated[float | None, Form(ge=0, description="Measured p50 latency in ms.")] = None,
    inputs: Annotated[str | None, Form(description="JSON list of TensorSpec; derived from ONNX if absent.")] = None,
    outputs: Annotated[str | None, Form(description="JSON list of TensorSpec.")] = None,
) -> ModelVersionPublic:
    """Store the file as a variant of `name:version`; deployments give each device the variant it runs best."""
    if coordinator.governance is not None:
        coordinator.governance.before_variant(registry.get_model_version(session=session, name=name, version=version))
    variants.add_variant(
        session=session,
        store=coordinator.store,
        name=name,
        version=version,
        variant=variant,
        stream=file.file,
        format=format,
        precision=precision,
        runtime=runtime,
        cpu_features=_string_list(cpu_features, "cpu_features"),
        accuracy=accuracy,
        agreement=agreement,
        latency_p50_ms=latency_p50_ms,
        inputs=_tensor_specs(inputs, "inputs"),
        outputs=_tensor_specs(outputs, "outputs"),
        actor=principal.name,
    )
    record = registry.get_model_version(session=session, name=name, version=version)
    if coordinator.governance is not None:
        coordinator.governance.version_changed(record)
    _sign(coordinator)
    session.refresh(record)
    return registry.version_public(record, public_url=coordinator.public_url)


def _sign(coordinator: CoordinatorDep) -> None:
    """Sign what the push made signable (low risk at once; high risk becomes a pending approval)."""
    if coordinator.governance is not None:
        coordinator.governance.sync()


@router.get("/models", summary="List models and their versions")
def list_models(session: SessionDep, coordinator: CoordinatorDep) -> ModelsPublic:
    """Every model with its versions."""
    rows = registry.list_models(session=session)
    cards = registry.version_cards(session=session, versions=[v for _, versions in rows for v in versions])
    data = [registry.model_public(m, v, public_url=coordinator.public_url, cards=cards) for m, v in rows]
    return ModelsPublic(data=data, count=len(data))


@router.get("/models/{name}", summary="One model and its versions")
def get_model(name: NamePath, session: SessionDep, coordinator: CoordinatorDep) -> ModelPublic:
    """A model with its versions, oldest first, each with its lineage and compression report."""
    model, versions = registry.get_model(session=session, name=name)
    cards = registry.version_cards(session=session, versions=versions)
    return registry.model_public(model, versions, public_url=coordinator.public_url, cards=cards)


@router.get("/models/{name}/versions/{version}", summary="One model version")
def get_model_version(
    name: NamePath, version: Annotated[Version, Path()], session: SessionDep, coordinator: CoordinatorDep
) -> ModelVersionPublic:
    """A model version with its digest, size, tensors, artifact URL, variants, lineage and compression report."""
    record = registry.get_model_version(session=session, name=name, version=version)
    card = registry.version_cards(session=session, versions=[record]).get(record.id or 0)
    return registry.version_public(record, public_url=coordinator.public_url, card=card)


@router.put(
    "/models/{name}/versions/{version}/trainable",
    dependencies=[_WRITE],
    summary="Set the trainable form of a version (a torch.export program, raw bytes)",
    responses={
        409: {"description": "The version has another trainable form already (versions are immutable)."},
        413: {"description": f"Larger than {registry.MAX_TRAINABLE_BYTES} bytes."},
        422: {"description": "Not a torch.export program (.pt2 zip archive)."},
    },
)
def put_trainable(
    name: NamePath,
    version: Annotated[Version, Path()],
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    file: Annotated[
        bytes,
        Body(
            media_type="application/octet-stream",
            description="The .pt2 archive `torch.export.save` writes (exported with a dynamic batch axis).",
        ),
    ] = b"",  # an empty body is refused by the registry with its own reason
) -> ModelVersionPublic:
    """Store the program federated runs of this version train (docs/federated.md); the same bytes again are fine."""
    if len(file) > registry.MAX_TRAINABLE_BYTES:
        raise PayloadTooLargeError(
            f"the trainable form is {len(file)} bytes; the limit is {registry.MAX_TRAINABLE_BYTES} bytes"
        )
    record = registry.set_trainable(
        session=session,
        store=coordinator.store,
        name=name,
        version=version,
        stream=io.BytesIO(file),
        actor=principal.name,
    )
    card = registry.version_cards(session=session, versions=[record]).get(record.id or 0)
    return registry.version_public(record, public_url=coordinator.public_url, card=card)


@router.get(
    "/models/{name}/versions/{version}/trainable",
    summary="The trainable form of a version (raw bytes)",
    response_class=FileResponse,
    responses={200: {"content": {"application/octet-stream": {}}}, 404: {"description": "No trainable form."}},
)
def get_trainable(
    name: NamePath, version: Annotated[Version, Path()], session: SessionDep, coordinator: CoordinatorDep
) -> FileResponse:
    """The .pt2 archive of `name:version` (its digest is the version's `trainable.sha256`)."""
    path = registry.trainable_path(session=session, store=coordinator.store, name=name, version=version)
    return FileResponse(path, media_type="application/octet-stream", filename=f"{name}-{version}.pt2")


@router.get(
    "/models/{name}/versions/{version}/profile",
    summary="The reference profile of a version (what drift is measured against)",
    responses={404: {"description": "No such version, or it was pushed without a reference profile."}},
)
def get_profile(name: NamePath, version: Annotated[Version, Path()], session: SessionDep) -> dict[str, Any]:
    """The `reference_profile.json` pushed with `name:version` (its digest is the version's `profile_sha256`)."""
    return registry.reference_profile(session=session, name=name, version=version).model_dump(mode="json")


class VersionDeleted(BaseModel):
    """A deleted version and the artifacts removed with it (those no other version shares)."""

    name: str
    version: str
    removed_artifacts: list[str]
    kept_artifacts: list[str]


@router.delete(
    "/models/{name}/versions/{version}",
    dependencies=[_WRITE],
    responses={409: {"description": "A device runs it, a deployment or rollout uses it, or an alias points to it"}},
    summary="Delete a model version",
)
def delete_model_version(
    name: NamePath,
    version: Annotated[Version, Path()],
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
) -> VersionDeleted:
    """Delete a version nothing uses any more (409 says what holds it), and its unshared artifacts.

    Its signed targets stay in the TUF repository (signed metadata only grows; no device is sent a deleted
    version); a high-risk version still awaiting approval has its pending role discarded.
    """
    record = registry.get_model_version(session=session, name=name, version=version)
    awaiting = record.risk_class == "high" and record.signing_state == "awaiting_approval"
    deleted = removal.delete_model_version(
        session=session, store=coordinator.store, name=name, version=version, actor=principal.name
    )
    if awaiting and coordinator.governance is not None:
        coordinator.governance.repository.discard_pending(high_role(name, version))
    return VersionDeleted(**asdict(deleted))
