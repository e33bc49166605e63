"""Root metadata: who may sign each top-level role, and the fleet's `x-edgefleet` policy (director, approvers).

`new_root` builds version 1; `next_root` derives the next version from the current one with a change (an
approver added or revoked, an online key or the root keys rotated). Both only build: signing needs the root
keys' holders (`sign_root`), and a new version must carry signatures of the old and the new root threshold.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from datetime import UTC, datetime

from securesystemslib.signer import Key, Signer
from tuf.api.metadata import Metadata, Role, Root

from cloud.governance.repository import EXPIRY
from protocol.governance import POLICY_FIELD

__all__ = ["ONLINE_TOP_LEVEL", "new_root", "next_root", "set_approvers", "set_online_key", "set_root_keys", "sign_root"]

ONLINE_TOP_LEVEL = ("targets", "snapshot", "timestamp")


def _expires(now: datetime) -> datetime:
    return (now + EXPIRY["root"]).replace(microsecond=0)


def new_root(root_keys: list[Key], root_threshold: int, online: dict[str, Key], approval_threshold: int) -> Metadata:
    """Root version 1 (unsigned): root keys with their threshold, online keys, the director; no approver yet."""
    if not 1 <= root_threshold <= len(root_keys):
        raise ValueError(f"root threshold {root_threshold} must be between 1 and {len(root_keys)}")
    now = datetime.now(UTC)
    root = Root(version=1, expires=_expires(now), consistent_snapshot=True)
    for key in root_keys:
        root.add_key(key, "root")
    root.roles["root"].threshold = root_threshold
    for role in ONLINE_TOP_LEVEL:
        root.add_key(online[role], role)
    director = online["director"]
    root.keys[director.keyid] = director
    root.unrecognized_fields[POLICY_FIELD] = {
        "director": {"keyids": [director.keyid], "threshold": 1},
        "approvers": {"keyids": [], "threshold": approval_threshold},
    }
    return Metadata(root)


def next_root(current: Root) -> Metadata:
    """A copy of `current` as the next version (unsigned, fresh expiry), to be changed and signed."""
    root = copy.deepcopy(current)
    root.version += 1
    root.expires = _expires(datetime.now(UTC))
    return Metadata(root)


def _prune_unused_keys(root: Root) -> None:
    policy = root.unrecognized_fields[POLICY_FIELD]
    used = {k for role in root.roles.values() for k in role.keyids}
    used |= set(policy["director"]["keyids"]) | set(policy["approvers"]["keyids"])
    for keyid in list(root.keys):
        if keyid not in used:
            del root.keys[keyid]


def set_approvers(root: Root, approvers: Iterable[Key], threshold: int | None = None) -> None:
    """Make `approvers` the root's approver set (threshold unchanged unless given)."""
    policy = root.unrecognized_fields[POLICY_FIELD]
    keys = list(approvers)
    for key in keys:
        root.keys[key.keyid] = key
    policy["approvers"]["keyids"] = sorted(k.keyid for k in keys)
    if threshold is not None:
        policy["approvers"]["threshold"] = threshold
    _prune_unused_keys(root)


def set_online_key(root: Root, role: str, key: Key) -> None:
    """Replace the key of an online role (`targets`, `snapshot`, `timestamp` or `director`)."""
    if role == "director":
        root.keys[key.keyid] = key
        root.unrecognized_fields[POLICY_FIELD]["director"]["keyids"] = [key.keyid]
    else:
        root.roles[role] = Role([key.keyid], 1)
        root.keys[key.keyid] = key
    _prune_unused_keys(root)


def set_root_keys(root: Root, keys: list[Key], threshold: int) -> None:
    """Replace the root keys and threshold (the new root must be signed by the old *and* the new threshold)."""
    root.roles["root"] = Role([k.keyid for k in keys], threshold)
    for key in keys:
        root.keys[key.keyid] = key
    _prune_unused_keys(root)


def sign_root(md: Metadata, signers: Iterable[Signer]) -> Metadata:
    """Add each signer's signature (appending: a threshold signs the same bytes)."""
    for signer in signers:
        md.sign(signer, append=True)
    return md
