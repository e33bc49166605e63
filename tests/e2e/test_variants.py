"""A mixed fleet gets, per device, the variant of one model version the policy names, and serves it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cloud.client import ApiClient
from simulators import MIXED_PROFILES, FleetConfig, SimulatedFleet, drive_inference
from tests.e2e.test_fleet_deploy import deployment_statuses, online_ids, wait_until
from tests.services import require_convert_extra

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture
def broker_url(mosquitto_url: str) -> str:
    """Variant assignment does not depend on the broker: Mosquitto only, to keep the suite short."""
    return mosquitto_url


@pytest.fixture(scope="module")
def compressed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference CNN compressed to every variant by the real `edgefleet compress` (accuracy-gated)."""
    require_convert_extra()
    out = tmp_path_factory.mktemp("compressed")
    edgefleet = Path(sys.executable).parent / "edgefleet"
    result = subprocess.run(
        [
            str(edgefleet),
            "compress",
            "digits-cnn",
            "--out",
            str(out),
            "--no-memory",
            "--latency-iterations",
            "100",
            "--to",
            "int8-static,int8-dynamic,fp16,tflite-int8",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def expected_variants(variants: dict[str, dict[str, Any]]) -> dict[str, str]:
    """What docs/variants.md's policy gives each profile of `simulators.MIXED_PROFILES`, for these measurements."""

    def p50(name: str) -> float:
        return float(variants[name]["latency"]["p50_ms"])

    return {
        # both runtimes and VNNI: the int8 variant measured fastest
        "x86-vnni-gateway": "tflite-int8" if p50("tflite-int8") <= p50("int8-static") else "int8-static",
        # ONNX only, VNNI: the faster accelerated int8 ONNX (fp16 is not accelerated without f16c/avx512_fp16)
        "x86-onnx-box": "int8-static" if p50("int8-static") <= p50("int8-dynamic") else "int8-dynamic",
        "x86-legacy": "fp32",  # no VNNI: full precision
        "arm-tflite-board": "tflite-int8",  # only a TFLite runtime
        # 256 MB: the smallest ONNX file
        "tiny-sensor": min((v for v in variants.values() if v["format"] == "onnx"), key=lambda v: v["size"])["name"],
    }


def test_mixed_fleet_receives_the_variant_each_device_runs_best(
    coordinator: ApiClient, topic_base: str, tmp_path: Path, compressed: Path
) -> None:
    manifest = json.loads((compressed / "variants.json").read_text())
    variants = {v["name"]: v for v in manifest["variants"]}
    assert {"fp32", "int8-static", "int8-dynamic", "fp16", "tflite-int8"} <= set(variants), manifest["refused"]
    expected = expected_variants(variants)
    # Every variant, TFLite included, takes `input` and answers `logits`: clients need not know which one runs.
    assert {(v["inputs"][0]["name"], v["outputs"][0]["name"]) for v in variants.values()} == {("input", "logits")}

    edgefleet = Path(sys.executable).parent / "edgefleet"
    push = subprocess.run(
        [
            str(edgefleet),
            "models",
            "push",
            "--variants",
            str(compressed),
            "--name",
            "digits-cnn",
            "--version",
            "2.0.0",
            "--url",
            coordinator.url,
            "--token",
            str(coordinator.token),
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert push.returncode == 0, push.stdout + push.stderr
    assert {v["name"] for v in json.loads(push.stdout)["variants"]} == set(variants) - {"fp32"}

    config = FleetConfig(
        devices=len(MIXED_PROFILES),
        data_root=tmp_path / "fleet",
        coordinator_url=coordinator.url,
        api_token=coordinator.token,
        topic_base=topic_base,
        id_prefix="mix",
        profiles=MIXED_PROFILES,
        telemetry_interval_s=3600,
    )
    with SimulatedFleet(config) as fleet:
        wait_until(lambda: set(fleet.device_ids) <= online_ids(coordinator), 30, "the mixed fleet to enrol")
        deployment = coordinator.deploy(model="digits-cnn", version="2.0.0", tags={"fleet": "mix"})
        wait_until(
            lambda: set(deployment_statuses(coordinator, deployment["id"]).values()) == {"succeeded"},
            90,
            "every device to activate its variant",
        )

        for agent, profile in zip(fleet.agents, MIXED_PROFILES, strict=True):
            wanted = expected[profile.name]
            assert agent.active_model is not None
            assert agent.active_model.sha256 == variants[wanted]["sha256"], f"{profile.name} should run {wanted}"

        traffic = drive_inference(fleet.agents, 100)
        for result, profile in zip(traffic, MIXED_PROFILES, strict=True):
            assert result.errors == 0, f"{profile.name}: {result.errors} failed requests"
            assert result.accuracy >= 0.9, f"{profile.name} serves its variant at accuracy {result.accuracy:.2f}"

        summary = {d["device_id"]: d for d in coordinator.fleet_summary()["devices"]}
        for agent, profile in zip(fleet.agents, MIXED_PROFILES, strict=True):
            assert summary[agent.config.device_id]["variant"] == expected[profile.name]
