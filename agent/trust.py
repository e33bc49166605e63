"""The device's trust gate: a desired state is acted on only if the fleet's signed metadata says so.

For every new desired generation of an enrolled device (one that holds the fleet's TUF root from enrolment):

1. `tuf.ngclient` refreshes the image repository's metadata (root chain, timestamp, snapshot, targets), which
   rejects rollback, freeze, mix-and-match and endless-data attacks on the metadata itself;
2. the director's instruction must verify against the root's director keys, name this device, be unexpired and
   carry exactly the desired generation (`protocol.governance.verify_director`);
3. the repository must list the instructed target with the same length and hashes (`get_targetinfo`);
4. a high-risk target must come from its role signed by the root's approval threshold of approvers
   (`protocol.governance.verify_approvals`) — so stolen online keys cannot make one installable;
5. the message's model name, version and format must be the signed target's (`custom`), and the returned
   desired state carries the *repository's* digest and length, which the download and the verifying phase
   then enforce. Unsigned fields of the MQTT message never decide what runs.

A failure of 1 to 5 is a `GovernanceError` (the update is refused, the current model keeps serving), and so is a
repository that serves more bytes than ngclient allows for a file (endless data: retrying will not shorten it); a
repository that cannot be reached, answers with an HTTP error or drops the connection is a `TransportError` (tried
again later).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import quote

import urllib3
from tuf.api.exceptions import DownloadError, DownloadLengthMismatchError, RepositoryError
from tuf.api.metadata import Metadata, Root, Snapshot, TargetFile
from tuf.ngclient import Updater, Urllib3Fetcher

from agent.errors import TransportError
from agent.identity import DeviceIdentity
from protocol import DesiredState
from protocol.governance import (
    DirectorInstruction,
    GovernanceError,
    high_role,
    risk_of,
    verify_approvals,
    verify_director,
)

__all__ = ["TrustGate", "trust_gate_for"]

Gate = Callable[[DesiredState], DesiredState]

log = logging.getLogger(__name__)


@contextmanager
def _repository_errors(what: str) -> Iterator[None]:
    """ngclient's errors as the agent's: who is at fault, and whether a retry helps."""
    try:
        yield
    except DownloadLengthMismatchError as exc:  # a DownloadError, but endless data is an attack, not an outage
        raise GovernanceError(f"{what}: the image repository served more than ngclient allows: {exc}") from exc
    except DownloadError as exc:
        raise TransportError(f"the image repository cannot be reached: {exc}") from exc
    except RepositoryError as exc:
        raise GovernanceError(f"{what} does not verify: {exc}") from exc
    # ngclient wraps only the errors of opening a response: a connection dropped mid-body is urllib3's own.
    except (OSError, urllib3.exceptions.HTTPError) as exc:
        raise TransportError(f"the image repository cannot be reached: {exc}") from exc


def trust_gate_for(identity: DeviceIdentity | None, metadata_dir: Path, timeout_s: float) -> Gate | None:
    """The gate's check for an enrolled device holding the fleet's TUF root; None (ungoverned, logged) else."""
    if identity is None or identity.tuf_url is None or not identity.root_path.exists():
        if identity is not None:
            log.warning("device %s has no TUF root from enrolment: updates are not governed", identity.device_id)
        return None
    return TrustGate(identity, metadata_dir, timeout_s=timeout_s).check


class TrustGate:
    """Checks desired states against the image repository and the director (see the module docstring)."""

    def __init__(self, identity: DeviceIdentity, metadata_dir: Path, *, timeout_s: float = 30.0) -> None:
        if identity.tuf_url is None or not identity.root_path.exists():
            raise GovernanceError(f"{identity.directory} holds no TUF root: enrol the device again")
        self._identity = identity
        self._dir = metadata_dir
        self._timeout = timeout_s

    def check(self, desired: DesiredState) -> DesiredState:
        """The desired state with its artifact as the signed metadata states it; `GovernanceError` if unverifiable."""
        if desired.model is None or not desired.director:
            raise GovernanceError("the desired state carries no signed director instruction")
        try:
            updater = self._refreshed()
        except TransportError:
            self._instruction(self._trusted_root(), desired)  # a forged instruction is refused even while offline
            raise
        root = self._trusted_root()
        instruction = self._instruction(root, desired)
        info = self._targetinfo(updater, instruction.path)
        if info.length != instruction.length or info.hashes != instruction.hashes:
            raise GovernanceError(f"the director and the image repository disagree about {instruction.path}")
        if risk_of(instruction.path) == "high":
            self._check_approvals(root, instruction.path, info)
        return self._trusted(desired, info)

    def _instruction(self, root: Root, desired: DesiredState) -> DirectorInstruction:
        assert desired.director is not None
        instruction = verify_director(root, desired.director, self._identity.device_id)
        if instruction.version != desired.generation:
            raise GovernanceError(
                f"the director signed generation {instruction.version}, the message claims {desired.generation}"
            )
        return instruction

    def _refreshed(self) -> Updater:
        self._dir.mkdir(parents=True, exist_ok=True)
        cached = (self._dir / "root.json").exists()
        updater = Updater(
            metadata_dir=str(self._dir),
            metadata_base_url=str(self._identity.tuf_url),
            fetcher=Urllib3Fetcher(socket_timeout=math.ceil(self._timeout)),
            bootstrap=None if cached else self._identity.root_path.read_bytes(),
        )
        with _repository_errors("the image repository's metadata"):
            updater.refresh()
        return updater

    def _trusted_root(self) -> Root:
        """The newest root ngclient verified and stored (else the enrolment root, the chain's anchor)."""
        cached = self._dir / "root.json"
        return Metadata[Root].from_file(str(cached if cached.exists() else self._identity.root_path)).signed

    def _targetinfo(self, updater: Updater, path: str) -> TargetFile:
        with _repository_errors(f"{path}: the repository's delegated metadata"):
            info = updater.get_targetinfo(path)
        if info is None:
            raise GovernanceError(f"{path} is not in the fleet's image repository (unsigned, or not approved)")
        return info

    def _check_approvals(self, root: Root, path: str, info: TargetFile) -> None:
        """The version's high-risk role, as the verified snapshot lists it, signed by k of root's approvers.

        The role's bytes are the ones `get_targetinfo` just downloaded (within ngclient's length limit), checked
        against the snapshot and kept in the metadata directory: a second download could be endless, or differ.
        """
        parts = path.split("/")
        role = high_role(parts[1], parts[2])
        snapshot = Metadata[Snapshot].from_file(str(self._dir / "snapshot.json")).signed
        meta = snapshot.meta.get(f"{role}.json")
        if meta is None:
            raise GovernanceError(f"{path} is high risk and its approvals are not published")
        try:
            data = (self._dir / f"{quote(role, '')}.json").read_bytes()  # ngclient's name for a role's file
        except FileNotFoundError as exc:  # the target came from another role: the approved role never listed it
            raise GovernanceError(f"{path} is high risk and is not listed by its approved role {role}") from exc
        verify_approvals(root, data, role, path, info, datetime.now(UTC), version=meta.version)

    def _trusted(self, desired: DesiredState, info: TargetFile) -> DesiredState:
        assert desired.model is not None
        model = desired.model
        custom = info.unrecognized_fields.get("custom") or {}
        claimed = {"model": model.name, "version": model.version, "format": model.artifact.format.value}
        if model.variant is not None:
            claimed["variant"] = model.variant
        signed = {key: custom.get(key) for key in claimed}
        if claimed != signed:
            raise GovernanceError(f"the message names {claimed}, the signed target {info.path} is {signed}")
        if "sha256" not in info.hashes:
            raise GovernanceError(f"{info.path} is signed without a sha256 digest")
        artifact = model.artifact.model_copy(update={"sha256": info.hashes["sha256"], "size": info.length})
        return desired.model_copy(update={"model": desired.model.model_copy(update={"artifact": artifact})})
