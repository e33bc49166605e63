"""The director: a signed, fresh, per-device instruction to install one target now (`protocol.governance`).

Targets metadata signed by the director key (an online key the root names in its `x-edgefleet` policy): version =
the device's desired generation, one target (path, length, hashes, custom), the device id, and an expiry of
`INSTRUCTION_TTL`. The coordinator re-signs an instruction before it expires (same generation) for devices that
have not converged yet, so a device that was offline for a while still finds a fresh one.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

from tuf.api.metadata import Metadata, TargetFile, Targets
from tuf.api.serialization.json import JSONSerializer

from cloud.governance.keys import online_signer
from protocol.governance import DEVICE_FIELD

__all__ = ["INSTRUCTION_TTL", "Director", "sign_instruction"]

INSTRUCTION_TTL = timedelta(days=7)


class Director:
    """Signs instructions with the director key, read from `pki_dir` once: a wave of devices is one key read, not
    one a device (reading and parsing the key cost as much as the signature)."""

    def __init__(self, pki_dir: Path) -> None:
        self._signer = online_signer(pki_dir, "director")

    def sign(self, *, device_id: str, generation: int, target: TargetFile, now: datetime | None = None) -> str:
        """The signed instruction for `device_id` to install `target` as `generation` (JSON text)."""
        now = now or datetime.now(UTC)
        signed = Targets(
            version=max(1, generation),
            expires=(now + INSTRUCTION_TTL).replace(microsecond=0),
            targets={target.path: target},
            unrecognized_fields={DEVICE_FIELD: device_id},
        )
        md = Metadata(signed)
        md.sign(self._signer)
        return md.to_bytes(JSONSerializer(compact=True)).decode()


def sign_instruction(
    pki_dir: Path, *, device_id: str, generation: int, target: TargetFile, now: datetime | None = None
) -> str:
    """The signed instruction for `device_id` to install `target` as `generation` (JSON text)."""
    return Director(pki_dir).sign(device_id=device_id, generation=generation, target=target, now=now)
