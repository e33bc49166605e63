"""The variants manifest (`variants.json`): what `edgefleet compress` hands to `edgefleet models push --variants`.

One versioned schema, written by `compression` and read by the CLI and the demo through `read_manifest`,
which refuses a manifest of a format version this side does not read instead of guessing.

```json
{"format_version": 1, "max_drop_pp": 1.0, "evaluation": {"name": "digits", "samples": 360},
 "variants": [{"name": "fp32", "file": "fp32.onnx", "format": "onnx", "precision": "fp32", "sha256": "...",
               "size": 1234, "accuracy": 0.97, "agreement": 1.0, "latency": {"p50_ms": 0.1, "p99_ms": 0.3},
               "runtime": "onnxruntime", "cpu_features": [], "inputs": [...], "outputs": [...]}],
 "refused": [{"name": "int8-static", "reason": "accuracy drop 3.1 pp > 1 pp"}]}
```
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from protocol.errors import ManifestError
from protocol.messages import ModelFormat, Name, Sha256Hex, TensorSpec

__all__ = [
    "MANIFEST_FILE",
    "MANIFEST_FORMAT_VERSION",
    "ManifestEvaluation",
    "ManifestLatency",
    "ManifestVariant",
    "RefusedVariant",
    "VariantsManifest",
    "read_manifest",
    "write_manifest",
]

MANIFEST_FILE = "variants.json"
MANIFEST_FORMAT_VERSION = 1


class _Entry(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class ManifestLatency(_Entry):
    """Measured latency of a variant on the machine that compressed it."""

    p50_ms: float | None = None
    p99_ms: float | None = None


class ManifestVariant(_Entry):
    """One accepted variant: its file beside the manifest, what runs it, and how it measured."""

    name: Name
    file: str = Field(min_length=1)
    format: ModelFormat
    precision: str = "fp32"
    sha256: Sha256Hex
    size: int = Field(ge=0)
    accuracy: float | None = None
    agreement: float | None = None
    latency: ManifestLatency = Field(default_factory=ManifestLatency)
    runtime: str | None = None
    cpu_features: list[str] = Field(default_factory=list)
    inputs: list[TensorSpec] = Field(default_factory=list)
    outputs: list[TensorSpec] = Field(default_factory=list)


class RefusedVariant(_Entry):
    """A variant the accuracy gate refused, and why."""

    name: str
    reason: str


class ManifestEvaluation(_Entry):
    """The data set the variants were measured on."""

    name: str
    samples: int = Field(ge=0)


class VariantsManifest(_Entry):
    """The whole manifest; `variants` lists the accepted variants only (the fp32 baseline first)."""

    format_version: int = MANIFEST_FORMAT_VERSION
    max_drop_pp: float
    evaluation: ManifestEvaluation | None = None
    variants: list[ManifestVariant] = Field(min_length=1)
    refused: list[RefusedVariant] = Field(default_factory=list)

    def variant(self, name: str) -> ManifestVariant | None:
        """The accepted variant called `name`, if any."""
        return next((v for v in self.variants if v.name == name), None)

    @property
    def primary(self) -> ManifestVariant:
        """The variant a registry push makes primary: `fp32` when present, else the first."""
        return self.variant("fp32") or self.variants[0]


def read_manifest(directory: Path) -> VariantsManifest:
    """The manifest in `directory`, with every listed file present; `ManifestError` says what is wrong."""
    path = directory / MANIFEST_FILE
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ManifestError(f"{path}: not a variants manifest from `edgefleet compress` ({exc})") from exc
    if not isinstance(data, dict):
        raise ManifestError(f"{path}: not a variants manifest (a JSON object is expected)")
    version = data.get("format_version")
    if version != MANIFEST_FORMAT_VERSION:
        raise ManifestError(
            f"{path}: manifest format_version {version!r} is not supported (this edgefleet reads "
            f"{MANIFEST_FORMAT_VERSION}); compress the model again with this version"
        )
    try:
        manifest = VariantsManifest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise ManifestError(f"{path}: {where}: {first['msg']}") from exc
    for entry in manifest.variants:
        if not (directory / entry.file).is_file():
            raise ManifestError(f"{path}: variant {entry.name!r} names a missing file {entry.file!r}")
    return manifest


def write_manifest(directory: Path, manifest: VariantsManifest) -> Path:
    """Write `manifest` as `directory/variants.json`; returns its path."""
    path = directory / MANIFEST_FILE
    path.write_text(json.dumps(manifest.model_dump(mode="json"), indent=2) + "\n")
    return path
