"""Artifacts from a CDN: the coordinator checks the device and redirects; the device trusts only the digest.

A coordinator process with `artifact_base_url` pointing at a second HTTP server on loopback (the "CDN",
serving copies of the artifacts named by sha256); real agents download through the 307.
"""

from __future__ import annotations

import functools
import shutil
import threading
from collections.abc import Iterator
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest

from cloud.client import ApiClient
from simulators import CoordinatorProcess, SimulatedFleet
from tests.e2e.test_fleet_deploy import deployment_statuses, fleet_config, online_ids, wait_until
from tests.e2e.test_update_failures import failure_of
from tests.services import FleetBroker, run_fleet_broker

pytestmark = pytest.mark.e2e


class StaticCdn:
    """A plain static file server on a free loopback port; remembers the paths it was asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.requested: list[str] = []
        cdn = self

        class Handler(SimpleHTTPRequestHandler):
            def do_GET(self) -> None:
                cdn.requested.append(self.path)
                super().do_GET()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/fleet-artifacts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def upload(self, store: Path, sha256: str) -> Path:
        """Copy an artifact from the coordinator's store to the CDN under its digest, as a sync job would."""
        target = self.root / "fleet-artifacts" / sha256
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(next(store.rglob(sha256)), target)
        return target


@pytest.fixture
def cdn(tmp_path: Path) -> Iterator[StaticCdn]:
    server = StaticCdn(tmp_path / "cdn")
    server.root.mkdir()
    server.thread.start()
    try:
        yield server
    finally:
        server.server.shutdown()
        server.server.server_close()


@pytest.fixture
def fleet_broker(coordinator_data_dir: Path, topic_base: str, tmp_path: Path) -> Iterator[FleetBroker]:
    """Mosquitto only: the broker is not what these tests are about."""
    with run_fleet_broker("mosquitto", tmp_path / "broker", coordinator_data_dir, topic_base) as broker:
        yield broker


@pytest.fixture
def coordinator(
    fleet_broker: FleetBroker, topic_base: str, coordinator_data_dir: Path, cdn: StaticCdn
) -> Iterator[ApiClient]:
    process = CoordinatorProcess(
        coordinator_data_dir,
        mqtt_url=fleet_broker.url,
        topic_base=topic_base,
        extra_args=fleet_broker.coordinator_args,
        env={"EDGEFLEET_ARTIFACT_BASE_URL": cdn.url},
    )
    client = process.start()
    try:
        yield client
    finally:
        assert process.stop() == 0, f"coordinator did not shut down cleanly; see {coordinator_data_dir}"


def other_bytes_same_model(source: Path, target: Path) -> Path:
    """The digits model with a different doc string: valid, same outputs, a different digest."""
    model = onnx.load(str(source))
    model.doc_string = "digits, rebuilt for the CDN test"
    onnx.save(model, str(target))
    return target


def test_agents_download_through_the_cdn_redirect_and_refuse_a_tampered_copy(
    coordinator: ApiClient,
    coordinator_data_dir: Path,
    cdn: StaticCdn,
    topic_base: str,
    tmp_path: Path,
    digits_model_path: Path,
) -> None:
    store = coordinator_data_dir / "artifacts"
    v1_sha = str(coordinator.push_model(digits_model_path, name="digits", version="1.0.0")["sha256"])
    cdn.upload(store, v1_sha)
    config = fleet_config(coordinator, topic_base, tmp_path / "fleet", 2, "cdn")
    fleet = SimulatedFleet(config)
    fleet.start()
    try:
        wait_until(lambda: set(fleet.device_ids) <= online_ids(coordinator), 30, "devices to enrol")
        first = coordinator.deploy(model="digits", version="1.0.0", tags={"fleet": "cdn"})
        wait_until(
            lambda: set(deployment_statuses(coordinator, first["id"]).values()) == {"succeeded"},
            60,
            "1.0.0 to be active everywhere, from the CDN",
        )
        assert cdn.requested.count(f"/fleet-artifacts/{v1_sha}") == 2, cdn.requested  # the bytes came from the CDN
        sample = {"input": np.random.default_rng(0).random((1, 64), dtype=np.float32)}
        before = fleet.agents[0].infer(sample)["probabilities"]

        v2 = other_bytes_same_model(digits_model_path, tmp_path / "digits-v2.onnx")
        v2_sha = str(coordinator.push_model(v2, name="digits", version="1.1.0")["sha256"])
        on_cdn = cdn.upload(store, v2_sha)
        data = bytearray(on_cdn.read_bytes())
        data[len(data) // 2] ^= 0xFF  # the CDN serves other bytes under the digest's name
        on_cdn.write_bytes(bytes(data))

        deployment = coordinator.deploy(model="digits", version="1.1.0", tags={"fleet": "cdn"})
        wait_until(
            lambda: set(deployment_statuses(coordinator, deployment["id"]).values()) == {"failed"},
            60,
            "every device to refuse the CDN's tampered 1.1.0",
        )
        for agent in fleet.agents:
            assert agent.active_model is not None and agent.active_model.version == "1.0.0"
            assert failure_of(coordinator, deployment["id"], agent.config.device_id)["error_code"] == "digest_mismatch"
        np.testing.assert_array_equal(before, fleet.agents[0].infer(sample)["probabilities"])
        assert f"/fleet-artifacts/{v2_sha}" in cdn.requested
    finally:
        fleet.stop()
