"""Governance cost, as ratios against baselines measured in the same run.

(a) update check: one device's trust-gate refresh (a fresh `tuf.ngclient.Updater`, metadata unchanged since
    the last check: timestamp fetched, the rest from its cache) against one plain HTTP GET of the same file
    from the same coordinator on a new connection (as the gate's new `Updater` opens one) — median ms;
(b) artifact verification: the agent's verifying phase (`protocol.verify_artifact`, size + sha256 of the
    repository's digest) and python-tuf's `TargetFile.verify_length_and_hashes` of a 50 MB file, against a
    plain `hashlib.sha256` of the same file;
(c) end-to-end deploy of one device (deploy call → the agent reports the new version active), governed (director
    instruction and repository checked on the device) against the same agent with governance off (its TUF
    root removed, as a device enrolled before governance) — median seconds over a few deploys each.

Run: `.venv/bin/python benchmarks/bench_governance.py [--checks 50] [--deploys 5] [--mb 50]` (about a minute).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import urllib3

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent import Agent, AgentConfig
from agent.identity import load_identity
from agent.trust import TrustGate
from benchmarks.bench_rollout import tiny_model
from cloud.client import ApiClient
from protocol import ArtifactRef, ModelFormat
from protocol.verification import verify_artifact
from simulators import CoordinatorProcess
from simulators.brokers import fleet_broker
from tests.e2e.clients import enrol_device

TOPIC_BASE = "bench/governance/v1"


def median_ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


def update_check(client: ApiClient, identity_dir: Path, work: Path, checks: int) -> dict[str, float]:
    """(a): a trust-gate refresh with unchanged metadata vs one plain GET of the same coordinator."""
    identity = load_identity(identity_dir.parent)
    assert identity is not None
    gate = TrustGate(identity, work / "tuf")
    gate._refreshed()  # the first check downloads everything; later ones find the metadata unchanged
    refresh, plain = [], []
    url = f"{client.url}/api/v1/tuf/metadata/timestamp.json"
    for _ in range(checks):
        t0 = time.perf_counter()
        gate._refreshed()
        refresh.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        urllib3.PoolManager().request("GET", url)  # a new connection, like the gate's new Updater
        plain.append(time.perf_counter() - t0)
    return {
        "update_check_ms": median_ms(refresh),
        "plain_get_ms": median_ms(plain),
        "update_check_ratio": round(statistics.median(refresh) / statistics.median(plain), 1),
    }


def verification(work: Path, megabytes: int, rounds: int = 5) -> dict[str, float]:
    """(b): verifying a large artifact against signed metadata vs hashing it."""
    from tuf.api.metadata import TargetFile

    path = work / "big.bin"
    with path.open("wb") as out:
        for _ in range(megabytes):
            out.write(hashlib.sha256(out.tell().to_bytes(8, "big")).digest() * 32768)
    size = path.stat().st_size
    digest = hashlib.file_digest(path.open("rb"), "sha256").hexdigest()
    ref = ArtifactRef(url="file:///big.bin", sha256=digest, size=size, format=ModelFormat.ONNX)
    target = TargetFile(size, {"sha256": digest}, "low/big/1/default.onnx")
    plain, agent_phase, tuf_check = [], [], []
    for _ in range(rounds):
        t0 = time.perf_counter()
        with path.open("rb") as f:
            hashlib.file_digest(f, "sha256").hexdigest()
        plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        verify_artifact(path, ref)
        agent_phase.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        with path.open("rb") as f:
            target.verify_length_and_hashes(f)
        tuf_check.append(time.perf_counter() - t0)
    base = statistics.median(plain)
    return {
        "artifact_mb": round(size / 1e6, 1),
        "sha256_ms": median_ms(plain),
        "verify_artifact_ms": median_ms(agent_phase),
        "verify_artifact_ratio": round(statistics.median(agent_phase) / base, 3),
        "tuf_verify_ms": median_ms(tuf_check),
        "tuf_verify_ratio": round(statistics.median(tuf_check) / base, 3),
    }


def deploy_times(client: ApiClient, agent: Agent, device: str, model: Path, versions: list[str]) -> list[float]:
    times = []
    for version in versions:
        client.push_model(model, name="tiny", version=version)
        t0 = time.perf_counter()
        client.deploy(model="tiny", version=version, device_ids=[device])
        if not agent.wait_for_model(version, 60):
            raise RuntimeError(f"{device} did not activate {version}: {agent.update_status}")
        times.append(time.perf_counter() - t0)
    return times


def start_agent(identity_dir: Path, coordinator_url: str) -> Agent:
    identity = load_identity(identity_dir.parent)
    assert identity is not None
    agent = Agent(
        AgentConfig(
            device_id=identity.device_id,
            data_dir=identity_dir.parent,
            coordinator_url=coordinator_url,
            http_port=None,
            telemetry_interval_s=3600,
            commit_after_s=0,  # no trial period: the time measured is the update path itself
        )
    )
    agent.start()
    return agent


def end_to_end(client: ApiClient, root: Path, deploys: int) -> dict[str, float]:
    """(c): deploy time of one governed device vs one with governance off, same coordinator and broker."""
    model = root / "tiny.onnx"
    model.write_bytes(tiny_model())
    result: dict[str, float] = {}
    for kind in ("governed", "ungoverned"):
        identity = enrol_device(client, root / "devices", kind)
        if kind == "ungoverned":  # as a device enrolled before governance: no TUF root, no checks
            identity.root_path.unlink()
            record = json.loads((identity.directory / "identity.json").read_text())
            record["tuf_url"] = None
            (identity.directory / "identity.json").write_text(json.dumps(record))
        agent = start_agent(identity.directory, client.url)
        try:
            versions = [f"{kind[0]}{i}" for i in range(deploys + 1)]
            times = deploy_times(client, agent, kind, model, versions)[1:]  # the first warms the caches
        finally:
            agent.stop()
        result[f"deploy_{kind}_s"] = round(statistics.median(times), 3)
    result["deploy_ratio"] = round(result["deploy_governed_s"] / result["deploy_ungoverned_s"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", type=int, default=50)
    parser.add_argument("--deploys", type=int, default=5)
    parser.add_argument("--mb", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        result: dict[str, object] = {}
        with fleet_broker("mosquitto", root / "broker", root / "coordinator", TOPIC_BASE) as broker:
            process = CoordinatorProcess(
                root / "coordinator", mqtt_url=broker.url, topic_base=TOPIC_BASE, extra_args=broker.coordinator_args
            )
            client = process.start()
            try:
                identity = enrol_device(client, root / "devices", "checker")
                result.update(update_check(client, identity.directory, root / "checker", args.checks))
                result.update(end_to_end(client, root, args.deploys))
            finally:
                process.stop()
        result.update(verification(root, args.mb))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
