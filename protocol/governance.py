"""Signed-artifact governance on the wire: what a device checks before it runs a model (verification only).

Two signed documents decide (the Uptane split of an image repository and a director, applied to models):

1. The fleet's **image repository**: standard TUF metadata (root → targets, snapshot, timestamp; consistent
   snapshots), read on the device with `tuf.ngclient`. Every variant of every version is a target
   `{risk}/{model}/{version}/{variant}.{format}` whose `custom` metadata carries model, version, variant,
   format, risk class, model-card digest and lineage. Low-risk targets are listed by the delegated role `low`
   (online key); each high-risk version by its own delegated role `high:{model}:{version}`, which must carry
   signatures of k distinct approvers.
2. The **director**: a per-device instruction, signed by the coordinator's director key — TUF targets metadata
   whose version is the device's desired generation, listing the one target the device should run now, with
   the device id in `x-edgefleet-device` and a short expiry.

The root metadata (threshold of offline root keys) anchors both extra rules in `x-edgefleet`: which keys are the
director's and which are the approvers' (with the approval threshold). A thief of the online keys can re-sign
targets, snapshot, timestamp and director metadata, but cannot change the root's approver set, so cannot make a
high-risk model installable. Signatures are checked with python-tuf / securesystemslib; nothing here signs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from protocol.errors import ErrorCode, VerificationError

__all__ = [
    "DEVICE_FIELD",
    "POLICY_FIELD",
    "DirectorInstruction",
    "GovernanceError",
    "RootPolicy",
    "high_role",
    "risk_of",
    "root_policy",
    "target_path",
    "verify_approvals",
    "verify_director",
]

POLICY_FIELD = "x-edgefleet"  # in root: {"director": {...}, "approvers": {...}}
DEVICE_FIELD = "x-edgefleet-device"  # in a director instruction: the device it is for
LOW_ROLE = "low"


class GovernanceError(VerificationError):
    """Signed metadata that does not verify: the device refuses the instruction and keeps serving."""

    code = ErrorCode.UNTRUSTED_UPDATE


def target_path(risk: str, model: str, version: str, variant: str, fmt: str) -> str:
    """The TUF target path of one variant of one version."""
    return f"{risk}/{model}/{version}/{variant}.{fmt}"


def risk_of(path: str) -> str:
    """The risk class a target path is published under (`low` or `high`)."""
    return path.split("/", 1)[0]


def high_role(model: str, version: str) -> str:
    """The delegated role that lists a high-risk version (signed by approvers)."""
    return f"high:{model}:{version}"


@dataclass(frozen=True)
class RootPolicy:
    """The keys root trusts for the director and the approvers, with their thresholds."""

    director_keyids: frozenset[str]
    director_threshold: int
    approver_keyids: frozenset[str]
    approval_threshold: int


def root_policy(root: Any) -> RootPolicy:
    """The `x-edgefleet` policy of a trusted `tuf.api.metadata.Root`; `GovernanceError` if it has none."""
    policy = root.unrecognized_fields.get(POLICY_FIELD)
    try:
        director, approvers = policy["director"], policy["approvers"]
        return RootPolicy(
            frozenset(director["keyids"]),
            int(director["threshold"]),
            frozenset(approvers["keyids"]),
            int(approvers["threshold"]),
        )
    except (TypeError, KeyError, ValueError) as exc:
        raise GovernanceError(f"the fleet's root metadata has no valid {POLICY_FIELD} policy ({exc})") from exc


def _valid_signers(md: Any, keys: Mapping[str, Any], keyids: frozenset[str]) -> set[str]:
    """Keyids (among `keyids`) whose signature over `md.signed` verifies, one per distinct public key.

    A keyid is only a label: the same public key listed under two keyids (an approver registered twice) would
    otherwise let one holder's signature, copied under both labels, count as two approvals.
    """
    from securesystemslib.exceptions import UnverifiedSignatureError

    signed = md.signed_bytes
    valid: dict[tuple[str, str], str] = {}
    for keyid in sorted(keyids):
        signature = md.signatures.get(keyid)
        key = keys.get(keyid)
        if signature is None or key is None:
            continue
        try:
            key.verify_signature(signature, signed)
        except UnverifiedSignatureError:  # includes securesystemslib's VerificationError (e.g. a non-hex sig)
            continue
        valid.setdefault((key.keytype, json.dumps(key.keyval, sort_keys=True)), keyid)
    return set(valid.values())


def _expired(expires: datetime, now: datetime) -> bool:
    return expires <= now


@dataclass(frozen=True)
class DirectorInstruction:
    """A verified instruction: install `path` (hashes and length in `target`) as generation `version`."""

    device_id: str
    version: int
    path: str
    length: int
    hashes: dict[str, str]
    custom: dict[str, Any]
    expires: datetime


def verify_director(
    root: Any, payload: str | bytes, device_id: str, now: datetime | None = None
) -> DirectorInstruction:
    """The instruction in `payload` if the root's director keys signed it for `device_id` and it has not expired."""
    from tuf.api.metadata import Metadata, Targets
    from tuf.api.serialization import DeserializationError

    now = now or datetime.now(UTC)
    policy = root_policy(root)
    try:
        md = Metadata[Targets].from_bytes(payload.encode() if isinstance(payload, str) else payload)
    except DeserializationError as exc:
        raise GovernanceError(f"the director instruction is not TUF targets metadata: {exc}") from exc
    if not isinstance(md.signed, Targets):
        raise GovernanceError("the director instruction is not targets metadata")
    signers = _valid_signers(md, root.keys, policy.director_keyids)
    if len(signers) < policy.director_threshold:
        raise GovernanceError("the director instruction is not signed by the fleet's director key")
    signed = md.signed
    claimed = signed.unrecognized_fields.get(DEVICE_FIELD)
    if claimed != device_id:
        raise GovernanceError(f"the director instruction is for device {claimed!r}, not {device_id!r}")
    if _expired(signed.expires, now):
        raise GovernanceError(f"the director instruction expired at {signed.expires.isoformat()}")
    if len(signed.targets) != 1:
        raise GovernanceError(f"the director instruction lists {len(signed.targets)} targets, expected one")
    target = next(iter(signed.targets.values()))
    custom = target.unrecognized_fields.get("custom") or {}
    return DirectorInstruction(
        device_id=device_id,
        version=signed.version,
        path=target.path,
        length=target.length,
        hashes=dict(target.hashes),
        custom=dict(custom),
        expires=signed.expires,
    )


def verify_approvals(
    root: Any,
    role_md: bytes,
    role: str,
    path: str,
    target: Any,
    now: datetime | None = None,
    *,
    version: int | None = None,
) -> set[str]:
    """The approver keyids whose signatures make `role` (listing `target` at `path`) count; `GovernanceError` else.

    Only keys the root names as approvers count, each once, and at least the root's approval threshold must
    have signed exactly the role metadata that lists this target with these hashes and this length.
    """
    from tuf.api.metadata import Metadata, Targets
    from tuf.api.serialization import DeserializationError

    now = now or datetime.now(UTC)
    policy = root_policy(root)
    try:
        md = Metadata[Targets].from_bytes(role_md)
    except DeserializationError as exc:
        raise GovernanceError(f"role {role}: not TUF targets metadata: {exc}") from exc
    if not isinstance(md.signed, Targets):
        raise GovernanceError(f"role {role} is not targets metadata")
    if version is not None and md.signed.version != version:
        raise GovernanceError(f"role {role} is version {md.signed.version}, the snapshot lists {version}")
    listed = md.signed.targets.get(path)
    if listed is None or listed.length != target.length or listed.hashes != target.hashes:
        raise GovernanceError(f"role {role} does not list {path} with the repository's hashes")
    if _expired(md.signed.expires, now):
        raise GovernanceError(f"role {role} expired at {md.signed.expires.isoformat()}: approvals must be renewed")
    signers = _valid_signers(md, root.keys, policy.approver_keyids)
    if len(signers) < policy.approval_threshold:
        raise GovernanceError(
            f"{path} is high risk and needs {policy.approval_threshold} approvals of the fleet's approvers; "
            f"{len(signers)} valid"
        )
    return signers
