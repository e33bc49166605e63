"""Signed-artifact governance through real agents on both brokers: what a device runs is what the fleet signed.

A high-risk version deploys only after k approvers signed it on their own machines (`edgefleet approve`); an
attacker on the broker with the coordinator's own MQTT identity cannot make a device run anything: every
forged or replayed instruction is refused, reported, and the device keeps serving its model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from agent import Agent
from cloud import cli
from cloud.client import ApiClient, ApiError
from cloud.governance.director import sign_instruction
from cloud.governance.keys import online_signer
from protocol import DesiredState, DeviceEvent, EventKind, Topics, decode, encode
from simulators import CoordinatorProcess
from simulators.faults import shifted_model
from tests.cloud.cards_helpers import CARD
from tests.e2e.clients import coordinator_tls, enrol_device, mqtt_session
from tests.e2e.test_fleet_deploy import wait_until
from tests.e2e.test_identity import agent_for
from tests.services import FleetBroker

pytestmark = pytest.mark.e2e

SAMPLE = {"input": np.random.default_rng(7).random((1, 64), dtype=np.float32)}


@dataclass
class Fleet:
    """A coordinator process (stoppable mid-test) and one enrolled agent serving digits 1.0.0."""

    process: CoordinatorProcess
    api: ApiClient
    agent: Agent
    data_dir: Path


@pytest.fixture
def fleet(
    fleet_broker: FleetBroker, topic_base: str, coordinator_data_dir: Path, tmp_path: Path, digits_model_path: Path
) -> Iterator[Fleet]:
    process = CoordinatorProcess(
        coordinator_data_dir, mqtt_url=fleet_broker.url, topic_base=topic_base, extra_args=fleet_broker.coordinator_args
    )
    api = process.start()
    agent: Agent | None = None
    try:
        identity = enrol_device(api, tmp_path / "devices", "victim")
        agent = agent_for(identity, tmp_path)
        agent.start()
        api.push_model(digits_model_path, name="digits", version="1.0.0")
        api.deploy(model="digits", version="1.0.0", device_ids=["victim"])
        assert agent.wait_for_model("1.0.0", 60), f"1.0.0 not active: {agent.update_status}"
        yield Fleet(process, api, agent, coordinator_data_dir)
    finally:
        if agent is not None:
            agent.stop()
        process.stop()


def edgefleet(*args: str, env: dict[str, str] | None = None) -> str:
    """Run the `edgefleet` CLI in-process; its output (fails the test on a non-zero exit)."""
    result = CliRunner().invoke(cli.build_app(load_plugins=False), list(args), env={"COLUMNS": "300", **(env or {})})
    assert result.exit_code == 0, f"edgefleet {' '.join(args)}: {result.output}"
    return result.output


def refused_deploy(api: ApiClient, version: str) -> str:
    with pytest.raises(ApiError) as refused:
        api.deploy(model="digits", version=version, device_ids=["victim"])
    assert refused.value.status == 409, refused.value
    return str(refused.value)


def test_high_risk_model_deploys_only_after_two_distinct_approvers_signed_it(
    fleet: Fleet, tmp_path: Path, digits_model_bytes: bytes
) -> None:
    api, agent = fleet.api, fleet.agent
    model = tmp_path / "digits-2.onnx"
    model.write_bytes(shifted_model(digits_model_bytes))
    card = tmp_path / "card.json"
    card.write_text(json.dumps({**CARD, "risk_class": "high"}))
    remote = ("--url", api.url, "--token", str(api.token))
    edgefleet(
        "models", "push", str(model), "-n", "digits", "-v", "2.0.0", "--risk", "high", "--card", str(card), *remote
    )
    assert "needs 2 approvals" in refused_deploy(api, "2.0.0")

    # Two approvers make their keys on their own machines; the offline root keys add them to the root.
    root_keys = Path(f"{fleet.data_dir}.root-keys")
    env = {"ROOT_PASS": (root_keys / "passphrase").read_text().strip(), "APPROVER_PASS": "approver secret"}
    signing_root = ("--root-key", str(root_keys / "root-1.key"), "--root-key", str(root_keys / "root-2.key"))
    tokens = {}
    for name in ("alice", "bob"):
        key = tmp_path / name / "approver.key"
        edgefleet("keys", "approver-keygen", "--out", str(key), "--passphrase-env", "APPROVER_PASS", env=env)
        edgefleet(
            "keys", "add-approver", name, "--public-key", str(key.with_suffix(".pub")), *signing_root,
            "--data-dir", str(fleet.data_dir), "--passphrase-env", "ROOT_PASS", env=env,
        )  # fmt: skip
        tokens[name] = api.post_json("/tokens", {"name": name, "role": "approver"})["token"]

    def approve(name: str) -> str:
        key = str(tmp_path / name / "approver.key")
        return edgefleet(
            "approve", "digits:2.0.0", "--key", key, "--passphrase-env", "APPROVER_PASS", "--yes",
            "--url", api.url, "--token", tokens[name], env=env,
        )  # fmt: skip

    assert "1 of 2 approvals" in approve("alice")
    assert "needs 2 approvals" in refused_deploy(api, "2.0.0")
    twice = CliRunner().invoke(
        cli.build_app(load_plugins=False),
        ["approve", "digits:2.0.0", "--key", str(tmp_path / "alice" / "approver.key"), "--passphrase-env",
         "APPROVER_PASS", "--yes", "--url", api.url, "--token", tokens["alice"]],
        env=env,
    )  # fmt: skip
    assert twice.exit_code != 0, "the same approver counted twice"
    assert "needs 2 approvals" in refused_deploy(api, "2.0.0")

    assert "2 of 2 approvals — published" in approve("bob")
    api.deploy(model="digits", version="2.0.0", device_ids=["victim"])
    assert agent.wait_for_model("2.0.0", 60), f"2.0.0 not active: {agent.update_status}"
    assert agent.active_model is not None and agent.active_model.version == "2.0.0"


Forge = Callable[[DesiredState], DesiredState]


def _unsigned(current: DesiredState) -> DesiredState:
    """A desired state without any director instruction (what an MQTT-only attacker can write)."""
    return current.model_copy(update={"generation": 50, "director": None})


def _replayed_with_a_higher_generation(current: DesiredState) -> DesiredState:
    """Yesterday's valid instruction, re-sent under a new generation number."""
    return current.model_copy(update={"generation": 51})


@pytest.mark.parametrize("forge", [_unsigned, _replayed_with_a_higher_generation], ids=lambda f: f.__name__[1:])
def test_forged_retained_desired_from_an_attacker_on_the_broker_is_refused_and_v1_keeps_serving(
    fleet: Fleet, fleet_broker: FleetBroker, topic_base: str, forge: Forge
) -> None:
    _forged_desired_is_refused(fleet, fleet_broker, topic_base, forge)


def test_director_instruction_for_another_device_or_signed_by_a_wrong_key_is_refused(
    fleet: Fleet, fleet_broker: FleetBroker, topic_base: str
) -> None:
    pki = fleet.data_dir / "pki"

    def for_another_device(current: DesiredState) -> DesiredState:
        return current.model_copy(update={"generation": 52, "director": _resign(pki, current, 52, device="mallory")})

    def signed_with_the_low_role_key(current: DesiredState) -> DesiredState:
        return current.model_copy(update={"generation": 53, "director": _resign(pki, current, 53, role="low")})

    _forged_desired_is_refused(fleet, fleet_broker, topic_base, for_another_device)
    _forged_desired_is_refused(fleet, fleet_broker, topic_base, signed_with_the_low_role_key)


def _resign(pki: Path, current: DesiredState, generation: int, *, device: str = "victim", role: str = "") -> str:
    """The current instruction's target in a new instruction (for `device`, signed by `role`'s key if given)."""
    from tuf.api.metadata import Metadata, Targets
    from tuf.api.serialization.json import JSONSerializer

    assert current.director is not None
    target = next(iter(Metadata[Targets].from_bytes(current.director.encode()).signed.targets.values()))
    signed = sign_instruction(pki, device_id=device, generation=generation, target=target)
    if not role:
        return signed
    md = Metadata[Targets].from_bytes(signed.encode())
    md.sign(online_signer(pki, role))  # replaces the director's signature
    return md.to_bytes(JSONSerializer(compact=True)).decode()


def _forged_desired_is_refused(fleet: Fleet, fleet_broker: FleetBroker, topic_base: str, forge: Forge) -> None:
    """The coordinator is down; an attacker with its broker identity publishes a forged retained desired state."""
    agent, topics = fleet.agent, Topics(topic_base)
    before = agent.infer(SAMPLE)["probabilities"]
    applied = agent.update_status
    assert applied is not None
    if fleet.process.proc is not None and fleet.process.proc.poll() is None:
        assert fleet.process.stop() == 0  # frees the coordinator's client id for the attacker
    subscriptions = (topics.desired("victim"), topics.events("victim"))
    with mqtt_session(fleet_broker.url, "thief", coordinator_tls(fleet.data_dir), subscribe=subscriptions) as attacker:
        assert attacker.refused is None, attacker.refused
        wait_until(lambda: _retained_desired(attacker.messages, topics) is not None, 10, "the retained desired state")
        current = _retained_desired(attacker.messages, topics)
        assert current is not None and current.director is not None
        forged = forge(current)
        attacker.client.publish(topics.desired("victim"), encode(forged), qos=1, retain=True).wait_for_publish(10)
        wait_until(lambda: _refusal(attacker.messages, forged.generation) is not None, 30, "the device to refuse")
        refusal = _refusal(attacker.messages, forged.generation)
    assert refusal is not None and refusal.error is not None and refusal.error.code.value == "untrusted_update"
    assert agent.active_model is not None and agent.active_model.version == "1.0.0"
    np.testing.assert_array_equal(agent.infer(SAMPLE)["probabilities"], before)
    status = agent.update_status
    assert status is not None and status.generation == applied.generation, "a refused generation was accepted"


def _retained_desired(messages: list[tuple[str, bytes, bool]], topics: Topics) -> DesiredState | None:
    found = [p for t, p, _ in messages if t == topics.desired("victim")]
    return decode(DesiredState, found[-1]) if found else None


def _refusal(messages: list[tuple[str, bytes, bool]], generation: int) -> DeviceEvent | None:
    for topic, payload, _retained in messages:
        if not topic.endswith("/events"):
            continue
        event = decode(DeviceEvent, payload)
        if event.kind is EventKind.UPDATE_REFUSED and event.generation == generation:
            return event
    return None


def test_low_risk_version_is_signed_at_push_and_a_stock_tuf_client_verifies_it(
    fleet: Fleet, digits_model_bytes: bytes, tmp_path: Path
) -> None:
    """No approvals for low risk; the repository is standard TUF: python-tuf's own client verifies the target."""
    import urllib3
    from tuf.api.exceptions import DownloadHTTPError
    from tuf.ngclient import FetcherInterface, Updater

    api, agent = fleet.api, fleet.agent
    model = tmp_path / "digits-1.1.onnx"
    model.write_bytes(shifted_model(digits_model_bytes))
    pushed = api.push_model(model, name="digits", version="1.1.0")
    assert (pushed["risk_class"], pushed["signing_state"]) == ("low", "signed")
    api.deploy(model="digits", version="1.1.0", device_ids=["victim"])
    assert agent.wait_for_model("1.1.0", 60), f"1.1.0 not active: {agent.update_status}"

    class BearerFetcher(FetcherInterface):
        """python-tuf's fetcher interface, sending the token that target downloads need (metadata is public)."""

        def __init__(self) -> None:
            self._pool = urllib3.PoolManager(headers={"Authorization": f"Bearer {api.token}"})

        def _fetch(self, url: str) -> Iterator[bytes]:
            response = self._pool.request("GET", url, preload_content=False, timeout=30)
            if response.status >= 400:
                raise DownloadHTTPError(f"HTTP {response.status}", response.status)
            return response.stream(65536)

    root = (tmp_path / "devices" / "victim" / "identity" / "root.json").read_bytes()  # the anchor from enrolment
    client_dir = tmp_path / "tuf-client"
    client_dir.mkdir()
    updater = Updater(
        metadata_dir=str(client_dir),
        metadata_base_url=f"{api.url}/api/v1/tuf/metadata/",
        target_base_url=f"{api.url}/api/v1/tuf/targets/",
        target_dir=str(tmp_path),
        fetcher=BearerFetcher(),
        bootstrap=root,
    )
    updater.refresh()
    info = updater.get_targetinfo("low/digits/1.1.0/default.onnx")
    assert info is not None and info.hashes["sha256"] == pushed["sha256"]
    assert info.unrecognized_fields["custom"]["risk"] == "low"
    assert Path(updater.download_target(info)).read_bytes() == model.read_bytes()
