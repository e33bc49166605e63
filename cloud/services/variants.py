"""Variants of a model version: store another artifact of an existing version (int8 ONNX, TFLite, ...).

Which variant a device gets is decided by the pure policy in `cloud.variant_policy`.
"""

from __future__ import annotations

from typing import BinaryIO

from pydantic import ValidationError
from sqlmodel import Session

from cloud import audit
from cloud.artifacts import ArtifactStore
from cloud.errors import ConflictError, InvalidInputError
from cloud.services.registry import declared_tensors, discard_unreferenced, get_model_version
from cloud.variant_policy import Variant, version_variants
from protocol.messages import ModelFormat, TensorSpec

__all__ = ["add_variant"]


def add_variant(
    *,
    session: Session,
    store: ArtifactStore,
    name: str,
    version: str,
    variant: str,
    stream: BinaryIO,
    format: ModelFormat,
    precision: str = "fp32",
    runtime: str | None = None,
    cpu_features: list[str] | None = None,
    accuracy: float | None = None,
    agreement: float | None = None,
    latency_p50_ms: float | None = None,
    inputs: list[TensorSpec] | None = None,
    outputs: list[TensorSpec] | None = None,
    actor: str = "system",
) -> Variant:
    """Store another artifact of `name:version` as variant `variant`; `ConflictError` if the name is taken.

    ONNX variants get their tensors from the graph when `inputs` is not given; other formats must declare
    them (`edgefleet compress` writes them into variants.json).
    """
    record = get_model_version(session=session, name=name, version=version)
    if variant in {v.name for v in version_variants(record)}:
        raise ConflictError(f"model {name}:{version} already has a variant {variant!r}")
    sha256, size = store.put(stream)
    inputs, outputs = declared_tensors(
        session=session, store=store, sha256=sha256, size=size, format=format, inputs=inputs, outputs=outputs
    )
    try:
        entry = Variant(
            name=variant,
            sha256=sha256,
            size=size,
            format=format,
            precision=precision,
            runtime=runtime,
            cpu_features=cpu_features or [],
            accuracy=accuracy,
            agreement=agreement,
            latency_p50_ms=latency_p50_ms,
            inputs=inputs,
            outputs=outputs,
        )
    except ValidationError as exc:
        discard_unreferenced(session, store, sha256)
        first = exc.errors()[0]
        raise InvalidInputError(f"variant {'.'.join(map(str, first['loc']))}: {first['msg']}") from exc
    # A new list object, so the JSON column is seen as changed.
    record.variants = [*record.variants, entry.model_dump(mode="json")]
    session.add(record)
    details = {"variant": variant, "sha256": sha256, "size": size, "format": format.value}
    audit.record(session=session, actor=actor, action="variant.added", subject=f"{name}:{version}", details=details)
    session.commit()
    return entry
