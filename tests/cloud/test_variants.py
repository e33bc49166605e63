"""Model variants: the assignment policy (pure, in table form) and the registry/deployment path on both databases."""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest
from sqlmodel import Session

from cloud.models import Device
from cloud.variant_policy import NoCompatibleVariantError, Variant, choose_variant
from protocol.messages import Capabilities, DesiredState
from tests.cloud.conftest import Api

INT8 = ["avx512_vnni", "avx_vnni", "asimddp"]
SPEC = [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]


def variant(name: str, fmt: str, precision: str, size: int, latency: float, features: list[str]) -> Variant:
    return Variant.model_validate(
        {
            "name": name,
            "sha256": hashlib.sha256(name.encode()).hexdigest(),
            "size": size,
            "format": fmt,
            "precision": precision,
            "cpu_features": features,
            "latency_p50_ms": latency,
            "inputs": SPEC,
        }
    )


VARIANTS = [
    variant("fp32", "onnx", "fp32", 70_000, 1.0, []),
    variant("int8-static", "onnx", "int8", 27_000, 0.8, INT8),
    variant("int8-dynamic", "onnx", "int8", 25_000, 3.0, INT8),
    variant("fp16", "onnx", "fp16", 41_000, 1.2, ["avx512_fp16", "asimdhp"]),
    variant("tflite-int8", "tflite", "int8", 21_000, 0.7, INT8),
]


@pytest.mark.parametrize(
    ("capabilities", "expected", "reason"),
    [
        (None, "fp32", "no runtimes"),
        ({"runtimes": ["onnxruntime"], "cpu_features": ["avx2"]}, "fp32", "full precision"),
        ({"runtimes": ["onnxruntime"], "cpu_features": ["avx2", "avx512_vnni"]}, "int8-static", "accelerated"),
        ({"runtimes": ["onnxruntime", "litert"], "cpu_features": ["avx_vnni"]}, "tflite-int8", "accelerated"),
        ({"runtimes": ["tflite_runtime"], "arch": "aarch64", "cpu_features": ["asimd", "asimddp"]}, "tflite-int8", ""),
        ({"runtimes": ["litert"], "cpu_features": []}, "tflite-int8", "without CPU acceleration"),
        ({"runtimes": ["onnxruntime"], "cpu_features": ["avx512_fp16"]}, "fp16", "accelerated"),
        ({"runtimes": ["onnxruntime"], "cpu_features": INT8, "memory_mb": 256}, "int8-dynamic", "low memory"),
        ({"runtimes": ["onnxruntime", "litert"], "memory_mb": 256}, "tflite-int8", "smallest"),
    ],
)
def test_device_gets_the_variant_the_policy_names(
    capabilities: dict[str, Any] | None, expected: str, reason: str
) -> None:
    caps = Capabilities.model_validate(capabilities) if capabilities is not None else None
    choice = choose_variant(VARIANTS, "fp32", caps)
    assert choice.variant.name == expected
    assert reason in choice.reason


def test_device_without_a_matching_runtime_is_refused_with_the_reason() -> None:
    with pytest.raises(NoCompatibleVariantError, match=r"runtimes \['tensorrt'\].*onnx \(onnxruntime\)"):
        choose_variant(VARIANTS, "fp32", Capabilities(runtimes=["tensorrt"]))


def add_variant(api: Api, name: str, content: bytes, expect: int = 201, **fields: str) -> dict[str, Any]:
    response = api.client.post(
        "/api/v1/models/digits/versions/1.0/variants",
        data={"variant": name, **fields},
        files={"file": (f"{name}.bin", content, "application/octet-stream")},
        headers=api.auth,
    )
    assert response.status_code == expect, response.text
    return dict(response.json())


def test_variants_registered_under_one_version_reach_devices_by_capability(api: Api, digits_model_bytes: bytes) -> None:
    api.push("digits", "1.0", digits_model_bytes, variant="fp32")
    add_variant(api, "int8-copy", digits_model_bytes + b"", precision="int8", cpu_features=json.dumps(INT8))
    tflite = b"TFL3 pretend flatbuffer"
    body = add_variant(
        api,
        "tflite-int8",
        tflite,
        format="tflite",
        precision="int8",
        cpu_features=json.dumps(INT8),
        inputs=json.dumps(SPEC),
        latency_p50_ms="0.01",
    )
    assert [v["name"] for v in body["variants"]] == ["int8-copy", "tflite-int8"]
    assert body["primary_variant"] == "fp32"

    api.report("x86-vnni", capabilities={"runtimes": ["onnxruntime"], "cpu_features": ["avx512_vnni"]})
    api.report("arm-tflite", capabilities={"runtimes": ["tflite_runtime"], "cpu_features": ["asimddp"]})
    api.report("old-agent")
    api.report("gpu-only", capabilities={"runtimes": ["tensorrt"]})
    response = api.client.post(
        "/api/v1/deployments",
        json={
            "model": "digits",
            "version": "1.0",
            "target": {"device_ids": ["x86-vnni", "arm-tflite", "old-agent", "gpu-only"]},
        },
        headers=api.auth,
    )
    assert response.status_code == 201, response.text
    targets = {t["device_id"]: t for t in response.json()["targets"]}
    assert targets["gpu-only"]["status"] == "failed"
    assert targets["gpu-only"]["error_code"] == "no_compatible_variant"

    with Session(api.coordinator.engine) as session:
        desired = {
            d: DesiredState.model_validate(session.get(Device, d).desired_state)
            for d in ("x86-vnni", "arm-tflite", "old-agent")
        }
        assert session.get(Device, "gpu-only").desired_state is None
    assert desired["x86-vnni"].model.variant == "int8-copy"
    assert desired["arm-tflite"].model.variant == "tflite-int8"
    assert desired["arm-tflite"].model.artifact.format == "tflite"
    assert desired["arm-tflite"].model.artifact.sha256 == hashlib.sha256(tflite).hexdigest()
    assert desired["old-agent"].model.variant == "fp32"
    assert desired["old-agent"].model.artifact.sha256 == hashlib.sha256(digits_model_bytes).hexdigest()
    artifact = api.client.get(desired["arm-tflite"].model.artifact.url.split("8080", 1)[1])
    assert artifact.content == tflite


def test_variant_upload_errors_name_the_problem(api: Api, digits_model_bytes: bytes) -> None:
    api.push("digits", "1.0", digits_model_bytes, variant="fp32")
    add_variant(api, "fp32", digits_model_bytes, expect=409)
    missing = add_variant(api, "tfl", b"TFL3", expect=422, format="tflite")
    assert "inputs are required" in json.dumps(missing)
    bad = add_variant(api, "x", digits_model_bytes, expect=422, cpu_features="avx2")
    assert "cpu_features" in json.dumps(bad)
    response = api.client.post(
        "/api/v1/models/digits/versions/9.9/variants",
        data={"variant": "v"},
        files={"file": ("v", digits_model_bytes)},
        headers=api.auth,
    )
    assert response.status_code == 404
    unauthenticated = api.anonymous.post(
        "/api/v1/models/digits/versions/1.0/variants", data={"variant": "v"}, files={"file": ("v", b"x")}
    )
    assert unauthenticated.status_code == 401
