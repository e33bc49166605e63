"""The closed retraining loop end to end, every part real: drift measured from the agents' own sketches against the
reference profile `edgefleet compress` made, a drift alert on one site, the continuous-training policy turning it
into a federated run on that site (SuperLink, the site's SuperNodes, their sample stores), the candidate built,
signed and canaried against the parent on the same site, and promoted by the rollout's gates.

Site `b` (3 devices) sees noisy digits (Gaussian noise, sd 0.5) in its traffic, and has labelled data of its own
(half noisy, labelled right through the agents' label endpoint); site `a` (2 devices) sees clean ones. Only site b
may drift, alert, retrain and move to the candidate.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from cloud.client import ApiClient
from tests.e2e.test_fleet_deploy import deployment_statuses, wait_until
from tests.federated.flower import require_flower
from tests.services import require_convert_extra

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(1500)]

require_convert_extra(module_level=True)

from compression.cnn import INPUT_SHAPE  # noqa: E402  (after the check that torch is there)
from compression.reference import load_digits_split  # noqa: E402
from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet, send_labelled_traffic  # noqa: E402
from simulators.drift import Drift  # noqa: E402

MODEL, PARENT = "digits-cnn", "1.0.0"
NOISE = Drift("noise", 0.5)
# Fast ticks: alerts and the loop react in seconds, not the production half-minute.
SETTINGS = {"EDGEFLEET_ALERT_TICK_S": "2", "EDGEFLEET_CT_TICK_S": "2", "EDGEFLEET_DRIFT_WINDOW_S": "600"}


@dataclass
class World:
    api: ApiClient
    site_a: SimulatedFleet
    site_b: SimulatedFleet
    x_clean: np.ndarray
    x_noisy: np.ndarray
    workdir: Path


def _edgefleet(*args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "edgefleet"), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)


def _images(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x.reshape(-1, *INPUT_SHAPE), dtype=np.float32)


@pytest.fixture(scope="module")
def world(mosquitto_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    require_flower()
    work = tmp_path_factory.mktemp("closed-loop")
    topic_base = f"ct{time.time_ns() % 10**9}/edgefleet/v1"
    compressed = work / "compressed"
    compress = _edgefleet(
        "compress", MODEL, "--out", str(compressed), "--to", "int8-static", "--no-memory", "--latency-iterations", "50"
    )
    assert compress.returncode == 0, compress.stdout[-2000:] + compress.stderr[-2000:]
    assert (compressed / "reference_profile.json").is_file(), "compress writes the drift reference"
    split = load_digits_split()
    with ExitStack() as stack:
        coordinator = CoordinatorProcess(
            work / "coordinator", mqtt_url=mosquitto_url, topic_base=topic_base, federated=True, env=SETTINGS
        )
        api = coordinator.start()
        stack.callback(coordinator.stop)
        push = _edgefleet(
            "models", "push", "--variants", str(compressed), "--name", MODEL, "--version", PARENT,
            "--url", api.url, "--token", str(api.token), "--json",
        )  # fmt: skip
        assert push.returncode == 0, push.stdout + push.stderr
        assert json.loads(push.stdout)["profile_sha256"], "the profile is stored (and signed) with the version"

        def fleet(prefix: str, devices: int, site: str) -> SimulatedFleet:
            config = FleetConfig(
                devices=devices, data_root=work / prefix, coordinator_url=api.url, api_token=api.token,
                topic_base=topic_base, id_prefix=prefix, tags={"site": site}, telemetry_interval_s=2.0,
                federated=True, sample_rates={MODEL: 1.0},
            )  # fmt: skip
            return stack.enter_context(SimulatedFleet(config))

        site_a, site_b = fleet("cla", 2, "a"), fleet("clb", 3, "b")
        for prefix in ("cla", "clb"):
            deployed = int(api.deploy(model=MODEL, version=PARENT, tags={"fleet": prefix})["id"])

            def done(d: int = deployed) -> bool:
                return set(deployment_statuses(api, d).values()) == {"succeeded"}

            wait_until(done, 120, "the parent")
        x_noisy = _images(NOISE.apply(split.x_train, np.random.default_rng(1)))
        # Site b's own labelled data, what it retrains on: half of what its cameras see is noisy (a model trained
        # on noise alone would lose the clean digits and fail the accuracy gate against the parent).
        noisy = np.random.default_rng(5).random(len(split.x_train)) < 0.5
        x_mixed = np.where(noisy[:, None, None, None], x_noisy, _images(split.x_train))
        for i, agent in enumerate(site_b.agents):
            part = slice(i, None, len(site_b.agents))
            assert send_labelled_traffic(agent, x_mixed[part], split.y_train[part]) == len(split.y_train[part])
        yield World(api, site_a, site_b, _images(split.x_test), x_noisy, work)


def _drive(world: World, stop: threading.Event) -> None:
    """Clean digits on site a, noisy ones on site b, until `stop` (drift and the canary's gates need traffic)."""
    while not stop.is_set():
        for fleet, x in ((world.site_a, world.x_clean), (world.site_b, world.x_noisy)):
            for agent in fleet.agents:
                start = int(np.random.default_rng().integers(0, len(x) - 16))
                with suppress(Exception):  # a device mid-update serves no model for a moment
                    agent.infer({"input": x[start : start + 16]})
        time.sleep(0.05)


def _ct(world: World, *args: str) -> subprocess.CompletedProcess[str]:
    return _edgefleet("ct", *args, "--url", world.api.url, "--token", str(world.api.token))


def _turns(world: World) -> list[dict[str, Any]]:
    return list(world.api.ct_status(MODEL)["actions"])


def test_drift_on_one_site_retrains_it_federatedly_and_a_canary_promotes_the_candidate(world: World) -> None:
    plan = world.workdir / "plan.json"
    plan.write_text(
        json.dumps(
            {
                "waves": [{"count": 1, "bake_seconds": 5}, {"percent": 100, "bake_seconds": 5}],
                # Install failures and error rate gate the canary; latency on a loaded 2-core CI machine is noise.
                "gates": {"min_inferences": 100, "min_class_samples": 100, "max_p95_latency_ratio": None},
            }
        )
    )
    policy = _ct(
        world, "set", MODEL, "--on", "drift", "--by", "site", "--retrain", "federated", "--rounds", "3",
        "--min-nodes", "3", "--local-epochs", "3", "--lr", "0.01", "--rollout", "canary",
        "--rollout-plan", str(plan), "--max-accuracy-drop", "0.08",
    )  # fmt: skip
    assert policy.returncode == 0, policy.stdout + policy.stderr
    stop = threading.Event()
    traffic = threading.Thread(target=_drive, args=(world, stop), daemon=True)
    traffic.start()
    try:
        wait_until(lambda: bool(_turns(world)), 180, "a drift alert on site b to start a turn of the loop")
        alerts = world.api.alerts(state="unresolved", rule="drift")
        sites = {(a["cohort"], a["model_name"]) for a in alerts if a["cohort"].startswith("site=")}
        assert sites == {("site=b", f"{MODEL}:{PARENT}")}  # (the fleet as a whole drifts too: 3 of its 5 devices)
        drift = world.api.drift(MODEL, PARENT, by="site")
        flagged = {c["cohort"]: c["drifted"] for c in drift["cohorts"] if not c["insufficient"]}
        assert flagged["site=b"] and not flagged.get("site=a", False), drift  # site a may have too few rows yet
        wait_until(lambda: _turns(world)[0]["status"] in ("promoted", "rolled_back", "failed"), 1200, "the turn to end")
    finally:
        stop.set()
        traffic.join(10)
    drift = world.api.drift(MODEL, PARENT, by="site")  # by now site a has served plenty: judged, not drifted
    flagged = {c["cohort"]: c["drifted"] for c in drift["cohorts"] if not c["insufficient"]}
    assert flagged.get("site=a") is False, drift
    [turn] = _turns(world)
    assert turn["status"] == "promoted", turn
    assert turn["cohort"] == "site=b" and turn["federated_run_id"] and turn["candidate_version"]
    run = world.api.federated_run(turn["federated_run_id"])
    assert sorted(run["devices"]) == sorted(world.site_b.device_ids) and run["selector"] == {"site": "b"}
    candidate = turn["candidate_version"]
    assert world.api.model_version(MODEL, candidate)["signing_state"] == "signed"
    assert {a.active_model.version for a in world.site_b.agents if a.active_model} == {candidate}
    assert {a.active_model.version for a in world.site_a.agents if a.active_model} == {PARENT}
    shown = _ct(world, "status")
    assert shown.returncode == 0 and "promoted" in shown.stdout
    log = world.api.get("/audit", after_seq=0, limit=1000)["data"]
    steps = [e["action"] for e in log if e["action"].startswith("ct.")]
    assert steps[:4] == ["ct.policy_set", "ct.training", "ct.rolling_out", "ct.promoted"], steps
