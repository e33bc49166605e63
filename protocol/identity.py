"""Device identity on the wire: how a fleet certificate names a device, and the enrolment messages.

A device's X.509 client certificate, issued by the fleet CA at enrolment, carries the device id as its
subject common name (what Mosquitto's `use_identity_as_username` reads) and as a SAN URI
`urn:edgefleet:device:<id>`; its organizational unit is `device`. The coordinator's own broker identity
is `COORDINATOR_IDENTITY`, which no device id can spell (device ids have no `:`).

Enrolment (HTTP, `POST /api/v1/enrolment`): the device makes its key pair, never sends the private key,
and sends a CSR with a one-time enrolment token (or the fleet's bootstrap secret, the weaker factory
option); the coordinator answers with the certificate, the CA certificate and where the broker is.
Renewal (`POST /api/v1/enrolment/renew`) sends a CSR of the same key: signing it proves possession.

This module reads certificates (verification side); making keys and signing CSRs is the agent's job,
issuing certificates the coordinator's.
"""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from protocol.errors import ProtocolError
from protocol.messages import DeviceId

__all__ = [
    "COORDINATOR_IDENTITY",
    "DEVICE_OU",
    "DEVICE_URI_PREFIX",
    "BrokerLocation",
    "EnrolmentRequest",
    "EnrolmentResponse",
    "IdentityError",
    "RenewalRequest",
    "certificate_identity",
]

COORDINATOR_IDENTITY = "edgefleet:coordinator"
DEVICE_OU = "device"
COORDINATOR_OU = "coordinator"
DEVICE_URI_PREFIX = "urn:edgefleet:device:"
_PEM_MAX = 16 * 1024


class IdentityError(ProtocolError, ValueError):
    """A certificate or CSR that does not carry an edgefleet identity."""


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)


class EnrolmentRequest(_Body):
    """A device asks for its certificate: the CSR (PEM) and one of the enrolment token or the bootstrap secret."""

    device_id: DeviceId
    csr_pem: str = Field(min_length=1, max_length=_PEM_MAX)
    token: str | None = Field(default=None, max_length=256)
    bootstrap_secret: str | None = Field(default=None, max_length=256)


class RenewalRequest(_Body):
    """A device asks for a fresh certificate for the key it holds (the CSR is signed with that key)."""

    device_id: DeviceId
    csr_pem: str = Field(min_length=1, max_length=_PEM_MAX)


class BrokerLocation(_Body):
    """Where the fleet's broker is now (`GET /api/v1/enrolment/broker`): an agent whose broker stopped answering
    asks again. Not secret — the broker admits fleet certificates only, and the agent checks the broker's."""

    broker_url: str = Field(max_length=2048)
    topic_base: str = Field(max_length=256)


class EnrolmentResponse(_Body):
    """What an enrolled device needs: its certificate, the fleet CA, where the broker is, its tags."""

    device_id: DeviceId
    certificate_pem: str
    ca_pem: str
    not_after: datetime
    broker_url: str
    topic_base: str
    coordinator_url: str
    tags: dict[str, str] = Field(default_factory=dict)
    # Governance trust anchor: the fleet's TUF root metadata (JSON) and where the image repository's metadata is.
    tuf_root: str | None = None
    tuf_url: str | None = None


def certificate_identity(certificate_pem: str | bytes) -> tuple[str, str]:
    """`(common name, organizational unit)` of a PEM certificate; `IdentityError` when it has neither."""
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    data = certificate_pem.encode() if isinstance(certificate_pem, str) else certificate_pem
    try:
        cert = x509.load_pem_x509_certificate(data)
    except ValueError as exc:
        raise IdentityError(f"not a PEM certificate: {exc}") from exc
    names = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    units = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if not names:
        raise IdentityError("certificate has no common name")
    return str(names[0].value), str(units[0].value) if units else ""
