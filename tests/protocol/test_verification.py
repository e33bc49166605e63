"""Artifact verification: the one explicit check between download and install."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from protocol import ArtifactRef, ArtifactSizeMismatchError, DigestMismatchError, ErrorCode, verify_artifact
from protocol.telemetry import LATENCY_BUCKETS_MS, histogram_quantile, latency_histogram, merge_histograms


def ref_for(data: bytes) -> ArtifactRef:
    return ArtifactRef(url="http://127.0.0.1/x", sha256=hashlib.sha256(data).hexdigest(), size=len(data))


def test_accepts_artifact_matching_size_and_digest(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model-bytes")
    verify_artifact(path, ref_for(b"model-bytes"))


def test_rejects_truncated_artifact(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model-by")
    with pytest.raises(ArtifactSizeMismatchError) as info:
        verify_artifact(path, ref_for(b"model-bytes"))
    assert info.value.code is ErrorCode.ARTIFACT_SIZE_MISMATCH
    assert not info.value.code.is_retryable


def test_rejects_tampered_artifact_of_the_same_size(tmp_path: Path) -> None:
    path = tmp_path / "m.onnx"
    path.write_bytes(b"model-bytez")
    with pytest.raises(DigestMismatchError, match="expected"):
        verify_artifact(path, ref_for(b"model-bytes"))


def test_histogram_percentiles_merge_across_windows() -> None:
    first = latency_histogram([0.4] * 90)
    second = latency_histogram([40.0] * 10)
    merged = merge_histograms([first, second])
    assert sum(merged) == 100
    assert histogram_quantile(merged, 0.5) == 0.5
    assert histogram_quantile(merged, 0.95) == 50
    assert histogram_quantile([0] * (len(LATENCY_BUCKETS_MS) + 1), 0.5) is None


def test_latency_beyond_last_bucket_counts_as_infinite() -> None:
    assert histogram_quantile(latency_histogram([10_000.0]), 0.99) == float("inf")
