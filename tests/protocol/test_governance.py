"""What a device checks before it trusts a director instruction or a high-risk role (`protocol.governance`).

Real Ed25519 keys and real TUF metadata built with `tuf.api` and `cloud.governance.root`; nothing is mocked.
Each test is an attack the check must refuse, or the one instruction it must accept.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from securesystemslib.signer import CryptoSigner, Signature, SSlibKey
from tuf.api.metadata import Metadata, Root, TargetFile, Targets, Timestamp
from tuf.api.serialization.json import JSONSerializer

from cloud.governance.director import sign_instruction
from cloud.governance.keys import online_signer
from cloud.governance.root import new_root, next_root, set_approvers, sign_root
from protocol.governance import (
    DEVICE_FIELD,
    GovernanceError,
    high_role,
    root_policy,
    target_path,
    verify_approvals,
    verify_director,
)

DEVICE = "dev-1"
PATH = target_path("high", "detector", "2.0", "fp32", "onnx")
ROLE = high_role("detector", "2.0")
_COMPACT = JSONSerializer(compact=True)


@dataclass
class Fleet:
    """A root (2 of 3 root keys) with online keys, a director key and two approvers, threshold 2."""

    root_signers: list[CryptoSigner]
    online: dict[str, CryptoSigner]
    approvers: list[CryptoSigner]
    root: Root

    def rotate(self, approvers: list[CryptoSigner], threshold: int | None = None) -> Root:
        """The next root version with `approvers` as the approver set."""
        md = next_root(self.root)
        assert isinstance(md.signed, Root)
        set_approvers(md.signed, [s.public_key for s in approvers], threshold)
        sign_root(md, self.root_signers[:2])
        return md.signed


def _signer() -> CryptoSigner:
    return CryptoSigner.generate_ed25519()


@pytest.fixture
def fleet() -> Fleet:
    root_signers = [_signer() for _ in range(3)]
    online = {role: _signer() for role in ("targets", "snapshot", "timestamp", "low", "director")}
    approvers = [_signer(), _signer()]
    md = new_root([s.public_key for s in root_signers], 2, {r: s.public_key for r, s in online.items()}, 2)
    assert isinstance(md.signed, Root)
    set_approvers(md.signed, [s.public_key for s in approvers])
    sign_root(md, root_signers[:2])
    return Fleet(root_signers, online, approvers, md.signed)


def _target(path: str = PATH, digest: str = "ab" * 32, length: int = 1234) -> TargetFile:
    custom = {"model": "detector", "version": "2.0", "variant": "fp32", "format": "onnx", "risk": "high"}
    return TargetFile(length, {"sha256": digest}, path, unrecognized_fields={"custom": custom})


def _instruction(
    signer: CryptoSigner,
    *,
    device_id: str = DEVICE,
    targets: list[TargetFile] | None = None,
    version: int = 7,
    expires: datetime | None = None,
) -> bytes:
    signed = Targets(
        version=version,
        expires=expires or datetime.now(UTC).replace(microsecond=0) + timedelta(days=7),
        targets={t.path: t for t in (targets if targets is not None else [_target()])},
        unrecognized_fields={DEVICE_FIELD: device_id},
    )
    md = Metadata(signed)
    md.sign(signer)
    return md.to_bytes(_COMPACT)


def _role(
    signers: list[CryptoSigner],
    *,
    targets: list[TargetFile] | None = None,
    version: int = 1,
    expires: datetime | None = None,
) -> Metadata[Targets]:
    signed = Targets(
        version=version,
        expires=expires or datetime.now(UTC).replace(microsecond=0) + timedelta(days=365),
        targets={t.path: t for t in (targets if targets is not None else [_target()])},
    )
    md = Metadata(signed)
    for signer in signers:
        md.sign(signer, append=True)
    return md


def _bytes(md: Metadata[Targets]) -> bytes:
    return md.to_bytes(_COMPACT)


# -- the director ----------------------------------------------------------------------------------------


def test_accepts_instruction_signed_by_the_director_for_this_device(fleet: Fleet) -> None:
    payload = _instruction(fleet.online["director"])

    instruction = verify_director(fleet.root, payload, DEVICE)

    assert (instruction.device_id, instruction.version, instruction.path) == (DEVICE, 7, PATH)
    assert (instruction.length, instruction.hashes) == (1234, {"sha256": "ab" * 32})
    assert instruction.custom["model"] == "detector"


def test_accepts_instruction_of_the_coordinators_signer(fleet: Fleet, tmp_path: Path) -> None:
    """What `cloud.governance.director.sign_instruction` makes is what the device accepts (text, not bytes)."""
    director = online_signer(tmp_path, "director")
    md = next_root(fleet.root)
    assert isinstance(md.signed, Root)
    md.signed.keys[director.public_key.keyid] = director.public_key
    md.signed.unrecognized_fields["x-edgefleet"]["director"]["keyids"] = [director.public_key.keyid]
    payload = sign_instruction(tmp_path, device_id=DEVICE, generation=3, target=_target())

    assert verify_director(md.signed, payload, DEVICE).version == 3


@pytest.mark.parametrize("role", ["targets", "snapshot", "timestamp", "low"])
def test_rejects_instruction_signed_by_a_non_director_key(fleet: Fleet, role: str) -> None:
    with pytest.raises(GovernanceError, match="not signed by the fleet's director key"):
        verify_director(fleet.root, _instruction(fleet.online[role]), DEVICE)


def test_rejects_instruction_signed_by_a_root_key(fleet: Fleet) -> None:
    with pytest.raises(GovernanceError, match="director key"):
        verify_director(fleet.root, _instruction(fleet.root_signers[0]), DEVICE)


def test_rejects_director_signature_copied_under_another_keyid(fleet: Fleet) -> None:
    """A signature of another key relabelled with the director's keyid does not verify."""
    md = Metadata[Targets].from_bytes(_instruction(fleet.online["low"]))
    director_keyid = fleet.online["director"].public_key.keyid
    (only,) = md.signatures.values()
    md.signatures.clear()
    md.signatures[director_keyid] = Signature(director_keyid, only.signature)

    with pytest.raises(GovernanceError, match="director key"):
        verify_director(fleet.root, md.to_bytes(_COMPACT), DEVICE)


def test_rejects_instruction_for_another_device(fleet: Fleet) -> None:
    payload = _instruction(fleet.online["director"], device_id="dev-2")

    with pytest.raises(GovernanceError, match="for device 'dev-2'"):
        verify_director(fleet.root, payload, DEVICE)


def test_rejects_instruction_without_a_device(fleet: Fleet) -> None:
    md = Metadata[Targets].from_bytes(_instruction(fleet.online["director"]))
    del md.signed.unrecognized_fields[DEVICE_FIELD]
    md.sign(fleet.online["director"])

    with pytest.raises(GovernanceError, match="for device None"):
        verify_director(fleet.root, md.to_bytes(_COMPACT), DEVICE)


def test_rejects_expired_instruction(fleet: Fleet) -> None:
    expired = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    payload = _instruction(fleet.online["director"], expires=expired)

    with pytest.raises(GovernanceError, match="expired"):
        verify_director(fleet.root, payload, DEVICE)


def test_instruction_expires_at_its_expiry_on_the_devices_clock(fleet: Fleet) -> None:
    expires = datetime(2030, 1, 1, tzinfo=UTC)
    payload = _instruction(fleet.online["director"], expires=expires)

    assert verify_director(fleet.root, payload, DEVICE, now=expires - timedelta(seconds=1)).expires == expires
    with pytest.raises(GovernanceError, match="expired"):
        verify_director(fleet.root, payload, DEVICE, now=expires)


def test_rejects_instruction_listing_two_targets(fleet: Fleet) -> None:
    other = _target(target_path("low", "detector", "1.0", "fp32", "onnx"))
    payload = _instruction(fleet.online["director"], targets=[_target(), other])

    with pytest.raises(GovernanceError, match="lists 2 targets"):
        verify_director(fleet.root, payload, DEVICE)


def test_rejects_instruction_listing_no_target(fleet: Fleet) -> None:
    with pytest.raises(GovernanceError, match="lists 0 targets"):
        verify_director(fleet.root, _instruction(fleet.online["director"], targets=[]), DEVICE)


def test_rejects_target_hash_edited_after_the_director_signed(fleet: Fleet) -> None:
    document = json.loads(_instruction(fleet.online["director"]))
    document["signed"]["targets"][PATH]["hashes"]["sha256"] = "cd" * 32

    with pytest.raises(GovernanceError, match="director key"):
        verify_director(fleet.root, json.dumps(document), DEVICE)


def test_rejects_generation_edited_after_the_director_signed(fleet: Fleet) -> None:
    document = json.loads(_instruction(fleet.online["director"], version=3))
    document["signed"]["version"] = 9

    with pytest.raises(GovernanceError, match="director key"):
        verify_director(fleet.root, json.dumps(document), DEVICE)


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json at all",
        b"\xff\xfe\x00garbage",
        b"[]",
        b'{"signed": {}, "signatures": []}',
        b'{"signatures": [], "signed": {"_type": "targets"}}',
    ],
    ids=["empty", "text", "binary", "json-list", "empty-signed", "targets-without-fields"],
)
def test_rejects_director_payload_that_is_not_targets_metadata(fleet: Fleet, payload: bytes) -> None:
    with pytest.raises(GovernanceError, match="not TUF targets metadata"):
        verify_director(fleet.root, payload, DEVICE)


def test_rejects_other_metadata_signed_by_the_director_key(fleet: Fleet) -> None:
    """A timestamp (validly signed by the director key) is not an instruction."""
    md = Metadata(Timestamp(version=1, expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)))
    md.sign(fleet.online["director"])

    with pytest.raises(GovernanceError, match="not"):
        verify_director(fleet.root, md.to_bytes(_COMPACT), DEVICE)


def test_rejects_director_signature_that_is_not_hex(fleet: Fleet) -> None:
    document = json.loads(_instruction(fleet.online["director"]))
    document["signatures"][0]["sig"] = "zz" * 64

    with pytest.raises(GovernanceError, match="director key"):
        verify_director(fleet.root, json.dumps(document), DEVICE)


def test_rejects_instruction_under_a_root_without_policy(fleet: Fleet) -> None:
    md = next_root(fleet.root)
    del md.signed.unrecognized_fields["x-edgefleet"]

    with pytest.raises(GovernanceError, match="no valid x-edgefleet policy"):
        verify_director(md.signed, _instruction(fleet.online["director"]), DEVICE)


# -- approvals of a high-risk role -----------------------------------------------------------------------


def test_approvals_of_k_approvers_return_the_signers(fleet: Fleet) -> None:
    md = _role(fleet.approvers)

    signers = verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target(), version=1)

    assert signers == {s.public_key.keyid for s in fleet.approvers}


def test_rejects_one_of_two_approvals(fleet: Fleet) -> None:
    with pytest.raises(GovernanceError, match=r"needs 2 approvals.*1 valid"):
        verify_approvals(fleet.root, _bytes(_role(fleet.approvers[:1])), ROLE, PATH, _target())


def test_rejects_unsigned_role(fleet: Fleet) -> None:
    with pytest.raises(GovernanceError, match="0 valid"):
        verify_approvals(fleet.root, _bytes(_role([])), ROLE, PATH, _target())


def test_rejects_one_approver_signing_twice(fleet: Fleet) -> None:
    """The same signature listed twice is not two approvals (the metadata is refused as malformed)."""
    document = json.loads(_bytes(_role(fleet.approvers[:1])))
    document["signatures"].append(dict(document["signatures"][0]))

    with pytest.raises(GovernanceError, match="not TUF targets metadata"):
        verify_approvals(fleet.root, json.dumps(document).encode(), ROLE, PATH, _target())


def test_rejects_one_approvers_signature_relabelled_as_the_other(fleet: Fleet) -> None:
    first, second = fleet.approvers
    md = _role([first])
    signature = md.signatures[first.public_key.keyid].signature
    md.signatures[second.public_key.keyid] = Signature(second.public_key.keyid, signature)

    with pytest.raises(GovernanceError, match="1 valid"):
        verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target())


def test_one_approver_counts_once_even_when_root_lists_their_key_twice(fleet: Fleet) -> None:
    """An approver registered twice (same public key under a second keyid) is still one approval."""
    alice = fleet.approvers[0]
    twin_keyid = "f" * 64
    public = alice.public_key
    twin = SSlibKey(twin_keyid, public.keytype, public.scheme, dict(public.keyval))
    md = next_root(fleet.root)
    assert isinstance(md.signed, Root)
    set_approvers(md.signed, [public, twin])
    role = _role([alice])
    role.signatures[twin_keyid] = Signature(twin_keyid, role.signatures[public.keyid].signature)

    with pytest.raises(GovernanceError, match="1 valid"):
        verify_approvals(md.signed, _bytes(role), ROLE, PATH, _target())


def test_rejects_signature_of_a_key_that_is_not_an_approver(fleet: Fleet) -> None:
    md = _role([fleet.approvers[0], fleet.online["targets"], fleet.online["low"], fleet.root_signers[0]])

    with pytest.raises(GovernanceError, match="1 valid"):
        verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target())


def test_rejects_signature_of_a_revoked_approver(fleet: Fleet) -> None:
    carol = _signer()
    rotated = fleet.rotate([fleet.approvers[0], carol])
    md = _role(fleet.approvers)  # signed by alice and bob; bob is revoked in root v2

    assert verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target())  # v1 still counts bob
    with pytest.raises(GovernanceError, match="1 valid"):
        verify_approvals(rotated, _bytes(md), ROLE, PATH, _target())
    assert verify_approvals(rotated, _bytes(_role([fleet.approvers[0], carol])), ROLE, PATH, _target())


def test_raised_threshold_needs_more_approvals(fleet: Fleet) -> None:
    carol = _signer()
    rotated = fleet.rotate([*fleet.approvers, carol], threshold=3)

    with pytest.raises(GovernanceError, match="needs 3 approvals"):
        verify_approvals(rotated, _bytes(_role(fleet.approvers)), ROLE, PATH, _target())


def test_rejects_role_listing_different_hashes(fleet: Fleet) -> None:
    md = _role(fleet.approvers, targets=[_target(digest="cd" * 32)])

    with pytest.raises(GovernanceError, match=r"does not list .* with the repository's hashes"):
        verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target())


def test_rejects_role_listing_a_different_length(fleet: Fleet) -> None:
    md = _role(fleet.approvers, targets=[_target(length=4321)])

    with pytest.raises(GovernanceError, match="repository's hashes"):
        verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target())


def test_rejects_role_that_does_not_list_the_target(fleet: Fleet) -> None:
    other = target_path("high", "detector", "2.0", "int8", "onnx")
    md = _role(fleet.approvers, targets=[_target(other)])

    with pytest.raises(GovernanceError, match="does not list"):
        verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target())


def test_rejects_target_hash_edited_after_the_approvers_signed(fleet: Fleet) -> None:
    document = json.loads(_bytes(_role(fleet.approvers, targets=[_target(digest="cd" * 32)])))
    document["signed"]["targets"][PATH]["hashes"]["sha256"] = "ab" * 32

    with pytest.raises(GovernanceError, match="0 valid"):
        verify_approvals(fleet.root, json.dumps(document).encode(), ROLE, PATH, _target())


def test_rejects_role_version_other_than_the_snapshots(fleet: Fleet) -> None:
    md = _role(fleet.approvers, version=1)

    with pytest.raises(GovernanceError, match="version 1, the snapshot lists 2"):
        verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target(), version=2)


def test_rejects_expired_role(fleet: Fleet) -> None:
    expired = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=1)
    md = _role(fleet.approvers, expires=expired)

    with pytest.raises(GovernanceError, match=r"expired .*approvals must be renewed"):
        verify_approvals(fleet.root, _bytes(md), ROLE, PATH, _target())


@pytest.mark.parametrize("payload", [b"", b"garbage", b"{}"], ids=["empty", "text", "empty-object"])
def test_rejects_role_that_is_not_metadata(fleet: Fleet, payload: bytes) -> None:
    with pytest.raises(GovernanceError, match="not TUF targets metadata"):
        verify_approvals(fleet.root, payload, ROLE, PATH, _target())


def test_rejects_role_that_is_other_metadata(fleet: Fleet) -> None:
    """A timestamp signed by both approvers is not a role listing targets."""
    md = Metadata(Timestamp(version=1, expires=datetime.now(UTC).replace(microsecond=0) + timedelta(days=1)))
    for signer in fleet.approvers:
        md.sign(signer, append=True)

    with pytest.raises(GovernanceError, match="not targets metadata"):
        verify_approvals(fleet.root, md.to_bytes(_COMPACT), ROLE, PATH, _target())


def test_root_policy_names_director_and_approvers(fleet: Fleet) -> None:
    policy = root_policy(fleet.root)

    assert policy.director_keyids == {fleet.online["director"].public_key.keyid}
    assert policy.approver_keyids == {s.public_key.keyid for s in fleet.approvers}
    assert (policy.director_threshold, policy.approval_threshold) == (1, 2)
