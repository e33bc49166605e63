"""The variants manifest: what `edgefleet compress` writes is what a push reads; other versions are refused."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from protocol.errors import ManifestError
from protocol.manifest import (
    MANIFEST_FILE,
    MANIFEST_FORMAT_VERSION,
    ManifestEvaluation,
    ManifestLatency,
    ManifestVariant,
    RefusedVariant,
    VariantsManifest,
    read_manifest,
    write_manifest,
)
from protocol.messages import Datatype, ModelFormat, TensorSpec


def _manifest(directory: Path) -> VariantsManifest:
    data = b"fp32-model-bytes"
    (directory / "fp32.onnx").write_bytes(data)
    spec = TensorSpec(name="input", datatype=Datatype.FP32, shape=[-1, 64])
    return VariantsManifest(
        max_drop_pp=1.0,
        evaluation=ManifestEvaluation(name="digits", samples=360),
        variants=[
            ManifestVariant(
                name="fp32",
                file="fp32.onnx",
                format=ModelFormat.ONNX,
                sha256=hashlib.sha256(data).hexdigest(),
                size=len(data),
                accuracy=0.97,
                agreement=1.0,
                latency=ManifestLatency(p50_ms=0.1, p99_ms=0.3),
                runtime="onnxruntime",
                inputs=[spec],
            )
        ],
        refused=[RefusedVariant(name="int8-static", reason="accuracy drop 3.1 pp > 1 pp")],
    )


def test_written_manifest_reads_back_unchanged(tmp_path: Path) -> None:
    manifest = _manifest(tmp_path)
    path = write_manifest(tmp_path, manifest)
    assert path == tmp_path / MANIFEST_FILE
    assert json.loads(path.read_text())["format_version"] == MANIFEST_FORMAT_VERSION
    assert read_manifest(tmp_path) == manifest
    assert read_manifest(tmp_path).primary.name == "fp32"


def test_manifest_of_a_newer_format_is_refused(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, _manifest(tmp_path))
    data = json.loads(path.read_text())
    data["format_version"] = 2
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="format_version 2 is not supported"):
        read_manifest(tmp_path)


def test_missing_manifest_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError, match="not a variants manifest"):
        read_manifest(tmp_path)


def test_manifest_naming_a_missing_variant_file_is_refused(tmp_path: Path) -> None:
    write_manifest(tmp_path, _manifest(tmp_path))
    (tmp_path / "fp32.onnx").unlink()
    with pytest.raises(ManifestError, match=r"missing file 'fp32\.onnx'"):
        read_manifest(tmp_path)


def test_manifest_with_an_invalid_digest_says_where(tmp_path: Path) -> None:
    path = write_manifest(tmp_path, _manifest(tmp_path))
    data = json.loads(path.read_text())
    data["variants"][0]["sha256"] = "not-a-digest"
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=r"variants\.0\.sha256"):
        read_manifest(tmp_path)
