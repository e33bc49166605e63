"""The device's identity: its private key (made here, never sent), its fleet certificate, and renewal.

`edgefleet-agent enroll` makes an ECDSA P-256 key, sends a CSR with the one-time enrolment token to the
coordinator (`POST /api/v1/enrolment`) and keeps, in `data_dir/identity/`::

    device.key      the private key (0600; never leaves the device)
    device.crt      the client certificate the fleet CA issued (CN = device id)
    ca.crt          the fleet CA: the only issuer the agent trusts for the broker's server certificate
    identity.json   device id, broker URL, topic base, coordinator URL, the coordinator's tags

Before the certificate expires (last third of its lifetime) the agent renews it with a CSR of the same key
(`POST /api/v1/enrolment/renew`); signing the CSR proves it holds the key, so no token is needed.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from agent.errors import ConfigError, TransportError
from agent.seq import start_counter
from protocol.identity import BrokerLocation, EnrolmentRequest, EnrolmentResponse, RenewalRequest

if TYPE_CHECKING:
    from cryptography import x509
    from cryptography.hazmat.primitives.asymmetric import ec

# cryptography and httpx are imported where they are used: an agent without a fleet identity (an explicit
# mqtt_url) never loads them (~10 MiB resident: cryptography's Rust extension and OpenSSL).

__all__ = ["DeviceIdentity", "enrol", "load_identity", "locate_broker", "needs_renewal", "renew"]

log = logging.getLogger(__name__)

IDENTITY_DIR = "identity"
_RENEW_FRACTION = 1 / 3  # renew once less than a third of the certificate's lifetime is left


@dataclass(frozen=True)
class DeviceIdentity:
    """An enrolled device's files and what the coordinator told it."""

    directory: Path
    device_id: str
    broker_url: str
    topic_base: str
    coordinator_url: str
    tags: dict[str, str]
    tuf_url: str | None = None  # the fleet's image repository metadata (None: enrolled before governance)

    @property
    def root_path(self) -> Path:
        """The fleet's TUF root metadata given at enrolment (the trust anchor of governance)."""
        return self.directory / "root.json"

    @property
    def key_path(self) -> Path:
        """The private key (PEM, 0600)."""
        return self.directory / "device.key"

    @property
    def cert_path(self) -> Path:
        """The client certificate (PEM)."""
        return self.directory / "device.crt"

    @property
    def ca_path(self) -> Path:
        """The fleet CA certificate (PEM)."""
        return self.directory / "ca.crt"

    def certificate(self) -> x509.Certificate:
        """The current client certificate."""
        from cryptography import x509

        return x509.load_pem_x509_certificate(self.cert_path.read_bytes())


def _write(path: Path, data: bytes, mode: int = 0o600) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _csr(device_id: str, key: ec.EllipticCurvePrivateKey) -> str:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _post(url: str, body: dict[str, object], timeout_s: float) -> EnrolmentResponse:
    import httpx

    try:
        response = httpx.post(url, json=body, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot reach the coordinator at {url}: {exc}") from exc
    if response.status_code >= 400:
        try:
            detail = response.json().get("detail", response.text)
        except ValueError:
            detail = response.text
        raise ConfigError(f"the coordinator refused ({response.status_code}): {detail}")
    return EnrolmentResponse.model_validate(response.json())


def _store(directory: Path, answer: EnrolmentResponse) -> DeviceIdentity:
    _write(directory / "device.crt", answer.certificate_pem.encode(), 0o644)
    _write(directory / "ca.crt", answer.ca_pem.encode(), 0o644)
    if answer.tuf_root and not (directory / "root.json").exists():  # the anchor is kept; ngclient walks its chain
        _write(directory / "root.json", answer.tuf_root.encode(), 0o644)
    identity = DeviceIdentity(
        directory=directory,
        device_id=answer.device_id,
        broker_url=answer.broker_url,
        topic_base=answer.topic_base,
        coordinator_url=answer.coordinator_url.rstrip("/"),
        tags=dict(answer.tags),
        tuf_url=answer.tuf_url,
    )
    _save_meta(identity)
    return identity


def enrol(
    *,
    data_dir: Path,
    coordinator_url: str,
    device_id: str,
    token: str | None = None,
    bootstrap_secret: str | None = None,
    timeout_s: float = 30.0,
) -> DeviceIdentity:
    """Make a key, send a CSR with the token (or bootstrap secret), store the certificate; returns the identity."""
    if (token is None) == (bootstrap_secret is None):
        raise ConfigError("give exactly one of an enrolment token and a bootstrap secret")
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    directory = data_dir / IDENTITY_DIR
    key = ec.generate_private_key(ec.SECP256R1())
    request = EnrolmentRequest(
        device_id=device_id, csr_pem=_csr(device_id, key), token=token, bootstrap_secret=bootstrap_secret
    )
    answer = _post(f"{coordinator_url.rstrip('/')}/api/v1/enrolment", request.model_dump(), timeout_s)
    encoding, fmt = serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8
    _write(directory / "device.key", key.private_bytes(encoding, fmt, serialization.NoEncryption()))
    identity = _store(directory, answer)
    start_counter(data_dir)
    log.info("enrolled as %s; certificate valid until %s", device_id, answer.not_after.isoformat())
    return identity


def load_identity(data_dir: Path) -> DeviceIdentity | None:
    """The identity in `data_dir/identity`, or None when the device has not enrolled."""
    directory = data_dir / IDENTITY_DIR
    meta_path = directory / "identity.json"
    if not meta_path.exists():
        return None
    try:
        meta = json.loads(meta_path.read_text())
        identity = DeviceIdentity(directory=directory, **meta)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"{meta_path}: unreadable device identity ({exc}); enrol again") from exc
    for path in (identity.key_path, identity.cert_path, identity.ca_path):
        if not path.exists():
            raise ConfigError(f"{path} is missing; enrol the device again (`edgefleet-agent enroll`)")
    return identity


def locate_broker(identity: DeviceIdentity, timeout_s: float = 10.0) -> DeviceIdentity:
    """Ask the coordinator where the broker is now; the identity with that URL (stored when it changed).

    `TransportError` when the coordinator cannot be reached, `ConfigError` when it answers nonsense.
    """
    import httpx

    url = f"{identity.coordinator_url}/api/v1/enrolment/broker"
    try:
        response = httpx.get(url, timeout=timeout_s)
        response.raise_for_status()
        location = BrokerLocation.model_validate(response.json())
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot ask {url} where the broker is: {exc}") from exc
    except ValueError as exc:
        raise ConfigError(f"{url} answered something that is not a broker location: {exc}") from exc
    if location.broker_url == identity.broker_url and location.topic_base == identity.topic_base:
        return identity
    moved = replace(identity, broker_url=location.broker_url, topic_base=location.topic_base)
    _save_meta(moved)
    return moved


def _save_meta(identity: DeviceIdentity) -> None:
    meta = {k: v for k, v in identity.__dict__.items() if k != "directory"}
    _write(identity.directory / "identity.json", (json.dumps(meta, indent=2) + "\n").encode(), 0o644)


def needs_renewal(certificate: x509.Certificate, now: datetime | None = None) -> bool:
    """True once less than a third of the certificate's lifetime is left. Pure."""
    now = now or datetime.now(UTC)
    start, end = certificate.not_valid_before_utc, certificate.not_valid_after_utc
    return (end - now) < (end - start) * _RENEW_FRACTION


def renew(identity: DeviceIdentity, timeout_s: float = 30.0) -> DeviceIdentity:
    """A fresh certificate for the device's key (a CSR signed with it proves possession); files replaced."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    loaded = serialization.load_pem_private_key(identity.key_path.read_bytes(), password=None)
    if not isinstance(loaded, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{identity.key_path} is not an EC private key")
    request = RenewalRequest(device_id=identity.device_id, csr_pem=_csr(identity.device_id, loaded))
    answer = _post(f"{identity.coordinator_url}/api/v1/enrolment/renew", request.model_dump(), timeout_s)
    renewed = _store(identity.directory, answer)
    log.info("certificate of %s renewed; valid until %s", identity.device_id, answer.not_after.isoformat())
    return renewed
