"""The device's trust gate against the classic TUF and Uptane attacks, through the real python-tuf ngclient.

A real `ImageRepository` on SQLite, root metadata signed by 2 of 3 encrypted root keys, approvers with their own
encrypted keys, and the repository's files served by a real HTTP server on 127.0.0.1 — which an attacker (a test)
can make serve other bytes: replayed, edited, endless or forged with the stolen online keys. Nothing is mocked;
each test is one attack (or the one update that must go through).
"""

from __future__ import annotations

import hashlib
import socket
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey
from sqlmodel import Session
from tuf.api.metadata import DelegatedRole, Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from agent.errors import TransportError
from agent.identity import DeviceIdentity
from agent.trust import TrustGate
from cloud.errors import ConflictError
from protocol.governance import DEVICE_FIELD, GovernanceError
from tests.agent.trust_helpers import (
    DEVICE,
    PREFIX,
    SERIALIZER,
    Clock,
    Fleet,
    MiB,
    build_fleet,
    make_target,
    role_of,
    truncated_response,
    unavailable_response,
)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    with build_fleet(tmp_path, Clock()) as built:
        yield built


# -- the update that must go through ------------------------------------------------------------------------


def test_accepts_low_risk_target_with_the_repositorys_digest_and_size(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"the real model")
    lying = fleet.desired(target, sha256="00" * 32, size=1)  # the unsigned MQTT fields lie

    trusted = fleet.check(lying)

    assert trusted.model is not None and lying.model is not None
    assert trusted.model.artifact.sha256 == hashlib.sha256(b"the real model").hexdigest()
    assert trusted.model.artifact.size == len(b"the real model")
    assert trusted.model.artifact.url == lying.model.artifact.url
    assert (trusted.generation, trusted.director) == (lying.generation, lying.director)


def test_accepts_a_second_update_from_cached_metadata(fleet: Fleet) -> None:
    first = fleet.publish_low("detector", "1.0", b"one")
    fleet.check(fleet.desired(first, 1))
    second = fleet.publish_low("detector", "1.1", b"two")

    trusted = fleet.check(fleet.desired(second, 2))

    assert trusted.model is not None and trusted.model.version == "1.1"


# -- arbitrary artifacts --------------------------------------------------------------------------------


def test_rejects_target_hash_edited_without_resigning(fleet: Fleet) -> None:
    """A man in the middle edits the listed digest; even a director (key stolen) agreeing with it does not help."""
    target = fleet.publish_low("detector", "1.0", b"the real model")
    evil = make_target("detector", "1.0", b"malware")
    name = f"{fleet.metadata('low').signed.version}.low.json"
    fleet.server.served[name] = fleet.file(name).replace(
        target.hashes["sha256"].encode(), evil.hashes["sha256"].encode()
    )
    assert fleet.server.served[name] != fleet.file(name)

    with pytest.raises(GovernanceError, match="delegated metadata does not verify"):
        fleet.check(fleet.desired(evil))


def test_rejects_artifact_the_repository_does_not_list(fleet: Fleet) -> None:
    """A thief of the director key alone cannot name an artifact the repository never signed."""
    fleet.publish_low("detector", "1.0", b"the real model")
    evil = make_target("detector", "1.0", b"malware")

    with pytest.raises(GovernanceError, match="disagree"):
        fleet.check(fleet.desired(evil))


def test_rejects_unpublished_model(fleet: Fleet) -> None:
    unknown = make_target("detector", "9.9", b"never pushed")

    with pytest.raises(GovernanceError, match="not in the fleet's image repository"):
        fleet.check(fleet.desired(unknown))


def test_rejects_desired_state_without_director_instruction(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"the real model")
    desired = fleet.desired(target).model_copy(update={"director": None})

    with pytest.raises(GovernanceError, match="no signed director instruction"):
        fleet.check(desired)


# -- rollback, freeze, mix-and-match, endless data --------------------------------------------------------


def test_rejects_rolled_back_timestamp(fleet: Fleet) -> None:
    first = fleet.publish_low("detector", "1.0", b"one")
    old_timestamp = fleet.file("timestamp.json")
    second = fleet.publish_low("detector", "1.1", b"two")
    fleet.check(fleet.desired(second, 1))  # the device has seen the newer timestamp

    fleet.server.served["timestamp.json"] = old_timestamp  # validly signed, older

    with pytest.raises(GovernanceError, match=r"timestamp version .* must be >="):
        fleet.check(fleet.desired(first, 2))


def test_rejects_rolled_back_snapshot(fleet: Fleet) -> None:
    fleet.publish_low("detector", "1.0", b"one")
    old_snapshot = fleet.file(f"{fleet.metadata('snapshot').signed.version}.snapshot.json")
    second = fleet.publish_low("detector", "1.1", b"two")
    fleet.check(fleet.desired(second, 1))
    third = fleet.publish_low("detector", "1.2", b"three")  # a fresh timestamp sends the device to a new snapshot

    fleet.server.served[f"{fleet.metadata('snapshot').signed.version}.snapshot.json"] = old_snapshot

    with pytest.raises(GovernanceError, match="does not verify"):
        fleet.check(fleet.desired(third, 2))


def test_rejects_rolled_back_role_even_with_stolen_online_keys(fleet: Fleet) -> None:
    """A snapshot and timestamp signed with the stolen keys cannot list an older `low` than the device saw."""
    fleet.publish_low("detector", "1.0", b"one")
    old_low = fleet.metadata("low")
    second = fleet.publish_low("detector", "1.1", b"two")
    fleet.check(fleet.desired(second, 1))

    fleet.forge({"low": old_low})

    with pytest.raises(GovernanceError, match=r"low.json version"):
        fleet.check(fleet.desired(second, 2))


def test_rejects_frozen_repository_with_expired_timestamp(tmp_path: Path) -> None:
    clock = Clock(datetime.now(UTC) - timedelta(days=2))  # everything below was signed two days ago
    with build_fleet(tmp_path, clock) as fleet:
        target = fleet.publish_low("detector", "1.0", b"one")

        with pytest.raises(GovernanceError, match=r"timestamp.json is expired"):
            fleet.check(fleet.desired(target))

        clock.now = datetime.now(UTC)  # the coordinator's maintainer re-signs: the same update goes through
        assert fleet.repository.refresh() == ["timestamp"]
        assert fleet.check(fleet.desired(target)).model is not None


def test_rejects_mix_and_match_of_low_role_versions(fleet: Fleet) -> None:
    first = fleet.publish_low("detector", "1.0", b"one")
    old = fleet.metadata("low").signed.version
    fleet.publish_low("detector", "1.1", b"two")
    current = fleet.metadata("low").signed.version

    fleet.server.served[f"{current}.low.json"] = fleet.file(f"{old}.low.json")  # validly signed, other snapshot

    with pytest.raises(GovernanceError, match=f"Expected low v{current}, got v{old}"):
        fleet.check(fleet.desired(first))


def test_rejects_mix_and_match_of_targets_versions(fleet: Fleet) -> None:
    low = fleet.publish_low("detector", "1.0", b"one")
    fleet.publish_high("classifier", "2.0", b"high")  # delegating to the approved role makes targets v2
    current = fleet.metadata("targets").signed.version
    assert current == 2

    fleet.server.served[f"{current}.targets.json"] = fleet.file("1.targets.json")

    with pytest.raises(GovernanceError, match="Expected targets v2, got v1"):
        fleet.check(fleet.desired(low))


def test_rejects_endless_timestamp(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    fleet.server.served["timestamp.json"] = fleet.server.endless("timestamp.json")

    started = time.monotonic()
    with pytest.raises(GovernanceError, match="exceeding the maximum allowed length"):
        fleet.check(fleet.desired(target))

    assert time.monotonic() - started < 5
    assert fleet.server.sent["timestamp.json"] < 16 * MiB


def test_rejects_endless_approval_role(fleet: Fleet) -> None:
    target = fleet.publish_high("detector", "2.0", b"high")
    name = f"1.{quote(role_of(target), '')}.json"
    fleet.server.served[name] = fleet.server.endless(name)

    started = time.monotonic()
    with pytest.raises(GovernanceError, match="exceeding the maximum allowed length"):
        fleet.check(fleet.desired(target))

    assert time.monotonic() - started < 5
    assert fleet.server.sent[name] < 16 * MiB


def test_approval_role_is_not_downloaded_again_past_ngclients_limits(fleet: Fleet) -> None:
    """Once verified, the role is read from ngclient's cache: a server turning it endless cannot exhaust memory."""
    target = fleet.publish_high("detector", "2.0", b"high")
    fleet.check(fleet.desired(target, 1))
    name = f"1.{quote(role_of(target), '')}.json"
    fleet.server.served[name] = fleet.server.endless(name)
    fleet.server.requests.clear()

    assert fleet.check(fleet.desired(target, 2)).model is not None
    assert name not in fleet.server.requests


# -- an unreachable repository is retried, not refused -----------------------------------------------------


def test_unreachable_repository_is_a_transport_error(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]  # closed once the block ends: nothing listens there
    identity = DeviceIdentity(**{**fleet.identity.__dict__, "tuf_url": f"http://127.0.0.1:{port}{PREFIX}"})

    with pytest.raises(TransportError, match="cannot be reached"):
        TrustGate(identity, fleet.metadata_dir, timeout_s=2.0).check(fleet.desired(target))


def test_repository_answering_503_is_a_transport_error(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    fleet.server.served["timestamp.json"] = unavailable_response

    with pytest.raises(TransportError, match="cannot be reached"):
        fleet.check(fleet.desired(target))


def test_connection_dropped_mid_download_is_a_transport_error(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    fleet.server.served["timestamp.json"] = truncated_response

    with pytest.raises(TransportError):
        fleet.check(fleet.desired(target))


# -- the director ---------------------------------------------------------------------------------------


def test_rejects_replayed_instruction_of_an_older_generation(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    replayed = fleet.instruct(target, generation=3)

    with pytest.raises(GovernanceError, match="signed generation 3, the message claims 4"):
        fleet.check(fleet.desired(target, 4, director=replayed))


def test_rejects_instruction_for_another_device(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    others = fleet.instruct(target, device_id="dev-2")

    with pytest.raises(GovernanceError, match="for device 'dev-2', not 'dev-1'"):
        fleet.check(fleet.desired(target, director=others))


@pytest.mark.parametrize("key", ["low", "targets", "timestamp"])
def test_rejects_instruction_signed_with_another_online_key(fleet: Fleet, key: str) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    signed = Targets(
        version=1,
        expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=7),
        targets={target.path: target},
        unrecognized_fields={DEVICE_FIELD: DEVICE},
    )
    md = Metadata(signed)
    md.sign(fleet.online(key))

    with pytest.raises(GovernanceError, match="not signed by the fleet's director key"):
        fleet.check(fleet.desired(target, director=md.to_bytes(JSONSerializer(compact=True)).decode()))


def test_rejects_expired_instruction(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    expired = fleet.instruct(target, now=datetime.now(UTC) - timedelta(days=8))

    with pytest.raises(GovernanceError, match="instruction expired"):
        fleet.check(fleet.desired(target, director=expired))


def test_rejects_director_and_repository_disagreeing_about_the_hashes(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    other = make_target("detector", "1.0", b"one, rebuilt")
    assert other.path == target.path

    with pytest.raises(GovernanceError, match="director and the image repository disagree"):
        fleet.check(fleet.desired(target, director=fleet.instruct(other)))


@pytest.mark.parametrize(
    "lie",
    [{"name": "other-model"}, {"version": "0.9"}, {"format": "tflite"}, {"variant": "int8"}],
    ids=["name", "version", "format", "variant"],
)
def test_rejects_message_naming_other_model_than_the_signed_target(fleet: Fleet, lie: dict[str, Any]) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")

    with pytest.raises(GovernanceError, match="the message names"):
        fleet.check(fleet.desired(target, **lie))


# -- high risk: approvals ---------------------------------------------------------------------------------


def test_accepts_high_risk_target_after_k_approvals(fleet: Fleet) -> None:
    target = fleet.prepare_high("detector", "2.0", b"high")
    alice, bob = fleet.approvers

    assert fleet.approve(target, alice) == (1, False)
    assert fleet.approve(target, bob) == (2, True)
    trusted = fleet.check(fleet.desired(target, sha256="00" * 32))

    assert trusted.model is not None and trusted.model.artifact.sha256 == target.hashes["sha256"]


def test_rejects_high_risk_target_with_one_of_two_approvals(fleet: Fleet) -> None:
    target = fleet.prepare_high("detector", "2.0", b"high")

    assert fleet.approve(target, fleet.approvers[0]) == (1, False)  # not published: nothing delegates to it
    with pytest.raises(GovernanceError, match="not in the fleet's image repository"):
        fleet.check(fleet.desired(target))


def test_rejects_high_risk_target_signed_into_low_role_with_stolen_online_keys(fleet: Fleet) -> None:
    """The thief lists the high-risk target in `low` and widens `low`'s paths: no approvals, so refused."""
    fleet.publish_low("detector", "1.0", b"one")
    target = make_target("detector", "2.0", b"high", risk="high")

    def widen(signed: Targets) -> None:
        assert signed.delegations is not None and signed.delegations.roles is not None
        signed.delegations.roles["low"].paths = ["low/*/*/*", "high/*/*/*"]

    def add(signed: Targets) -> None:
        signed.targets[target.path] = target

    fleet.forge({"targets": fleet.resigned("targets", widen), "low": fleet.resigned("low", add)})

    with pytest.raises(GovernanceError, match="high risk and its approvals are not published"):
        fleet.check(fleet.desired(target))


def test_rejects_fake_high_role_signed_with_stolen_online_keys(fleet: Fleet) -> None:
    """The thief publishes `high:detector:2.0` signed (and delegated) with online keys: approvers never signed."""
    target = make_target("detector", "2.0", b"high", risk="high")
    fleet.forge(_high_role_forgery(fleet, target, [fleet.online("low")]))

    with pytest.raises(GovernanceError, match="needs 2 approvals of the fleet's approvers; 0 valid"):
        fleet.check(fleet.desired(target))


def test_rejects_one_approval_with_threshold_lowered_by_stolen_online_keys(fleet: Fleet) -> None:
    """Alice's genuine signature, and targets (stolen key) delegating to her alone with threshold 1: refused."""
    target = fleet.prepare_high("detector", "2.0", b"high")
    alice = fleet.approvers[0]
    assert fleet.approve(target, alice) == (1, False)
    fleet.forge(_high_role_forgery(fleet, target, [alice]))

    with pytest.raises(GovernanceError, match="needs 2 approvals of the fleet's approvers; 1 valid"):
        fleet.check(fleet.desired(target))


def test_rejects_approved_role_edited_and_resigned_with_stolen_online_keys(fleet: Fleet) -> None:
    """An approved version's role re-listing another artifact, re-delegated to the online key: refused."""
    approved = fleet.publish_high("detector", "2.0", b"high")
    evil = make_target("detector", "2.0", b"malware", risk="high")
    assert approved.path == evil.path
    fleet.forge(_high_role_forgery(fleet, evil, [fleet.online("targets")], version=2))

    with pytest.raises(GovernanceError, match="0 valid"):
        fleet.check(fleet.desired(evil))


def test_one_approver_under_two_keyids_counts_once(fleet: Fleet) -> None:
    """Root holders were tricked into adding alice's key a second time under another keyid: still one approval."""
    alice = fleet.approvers[0]
    twin = SSlibKey("f" * 64, alice.public_key.keytype, alice.public_key.scheme, dict(alice.public_key.keyval))
    fleet.repository.update_root(fleet.next_root([alice.public_key, twin], fleet.root_signers[:2]))
    target = make_target("detector", "2.0", b"high", risk="high")
    forged = _high_role_forgery(fleet, target, [alice], keys=[alice.public_key, twin])
    role = forged[role_of(target)]
    role.signatures[twin.keyid] = Signature(twin.keyid, role.signatures[alice.public_key.keyid].signature)
    fleet.forge(forged)

    with pytest.raises(GovernanceError, match="1 valid"):
        fleet.check(fleet.desired(target))


def test_repository_counts_one_approver_under_two_keyids_once(fleet: Fleet) -> None:
    alice = fleet.approvers[0]
    twin = SSlibKey("f" * 64, alice.public_key.keytype, alice.public_key.scheme, dict(alice.public_key.keyval))
    fleet.repository.update_root(fleet.next_root([alice.public_key, twin], fleet.root_signers[:2]))
    target = fleet.prepare_high("detector", "2.0", b"high")
    assert fleet.approve(target, alice) == (1, False)
    with Session(fleet.engine) as session:
        md = Metadata[Targets].from_bytes(fleet.repository.pending(session, role_of(target)).data.encode())
    signature = md.signatures[alice.public_key.keyid].signature

    with pytest.raises(ConflictError, match="counts once"):
        fleet.repository.add_signature(role_of(target), twin.keyid, signature)
    with Session(fleet.engine) as session:
        assert not fleet.repository.pending(session, role_of(target)).published


def _high_role_forgery(
    fleet: Fleet,
    target: TargetFile,
    signers: list[CryptoSigner],
    *,
    version: int = 1,
    keys: list[SSlibKey] | None = None,
) -> dict[str, Metadata[Any]]:
    """A high-risk role listing `target`, signed by `signers`, and targets delegating to it (stolen targets key)."""
    role = role_of(target)
    md = Metadata(
        Targets(
            version=version,
            expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=365),
            targets={target.path: target},
        )
    )
    for signer in signers:
        md.sign(signer, append=True)
    delegated = keys or [s.public_key for s in signers]

    def delegate(signed: Targets) -> None:
        assert signed.delegations is not None and signed.delegations.roles is not None
        assert signed.delegations.keys is not None
        for key in delegated:
            signed.delegations.keys[key.keyid] = key
        paths = ["/".join(target.path.split("/")[:3]) + "/*"]
        signed.delegations.roles[role] = DelegatedRole(role, [k.keyid for k in delegated], len(delegated), True, paths)

    return {"targets": fleet.resigned("targets", delegate), role: md}


# -- root rotation ----------------------------------------------------------------------------------------


def test_rejects_root_rotation_signed_below_threshold(fleet: Fleet) -> None:
    """One stolen root key (of a 2-of-3 threshold) cannot make the attacker an approver."""
    target = fleet.publish_low("detector", "1.0", b"one")
    mallory = fleet.new_approver("mallory")
    forged = fleet.next_root([mallory.public_key], fleet.root_signers[:1], threshold=1)
    fleet.server.served["2.root.json"] = forged.to_bytes(SERIALIZER)

    with pytest.raises(GovernanceError, match="root was signed by 1/2 keys"):
        fleet.check(fleet.desired(target))
    assert fleet.trusted_root_version() == 1


def test_follows_root_rotation_signed_by_the_threshold(fleet: Fleet) -> None:
    target = fleet.publish_low("detector", "1.0", b"one")
    fleet.check(fleet.desired(target, 1))
    carol = fleet.new_approver("carol")
    # Root keys 2 and 3 sign this time: any threshold of the old (and new) root keys will do.
    approvers = [*(a.public_key for a in fleet.approvers), carol.public_key]
    fleet.repository.update_root(fleet.next_root(approvers, fleet.root_signers[1:]))

    assert fleet.check(fleet.desired(target, 2)).model is not None
    assert fleet.trusted_root_version() == 2


def test_revoked_approvers_signature_no_longer_counts(fleet: Fleet) -> None:
    target = fleet.publish_high("detector", "2.0", b"high")  # approved by alice and bob
    fleet.check(fleet.desired(target, 1))
    alice, _bob = fleet.approvers
    carol = fleet.new_approver("carol")

    fleet.repository.update_root(fleet.next_root([alice.public_key, carol.public_key], fleet.root_signers[:2]))

    with pytest.raises(GovernanceError, match="does not verify"):  # targets now delegates to alice and carol
        fleet.check(fleet.desired(target, 2))
    assert fleet.trusted_root_version() == 2
    newer = fleet.prepare_high("detector", "2.1", b"high, approved again")
    fleet.approve(newer, alice)
    assert fleet.approve(newer, carol) == (2, True)
    assert fleet.check(fleet.desired(newer, 3)).model is not None


def test_revoked_approver_does_not_count_even_if_stolen_online_keys_delegate_to_it(fleet: Fleet) -> None:
    """The thief re-delegates the role to alice and the revoked bob: ngclient accepts, the root's policy does not."""
    target = fleet.publish_high("detector", "2.0", b"high")
    alice, bob = fleet.approvers
    carol = fleet.new_approver("carol")
    fleet.repository.update_root(fleet.next_root([alice.public_key, carol.public_key], fleet.root_signers[:2]))
    role = role_of(target)

    def redelegate(signed: Targets) -> None:
        assert signed.delegations is not None and signed.delegations.keys is not None
        assert signed.delegations.roles is not None
        signed.delegations.keys[bob.public_key.keyid] = bob.public_key
        signed.delegations.roles[role].keyids = [alice.public_key.keyid, bob.public_key.keyid]

    fleet.forge({"targets": fleet.resigned("targets", redelegate)})

    with pytest.raises(GovernanceError, match="needs 2 approvals of the fleet's approvers; 1 valid"):
        fleet.check(fleet.desired(target))
