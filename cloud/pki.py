"""The fleet's certificate authority: device certificates from CSRs, the broker's and the Flower SuperLink's server
certificates, the coordinator's client certificate, and the certificate revocation list both brokers check.

Everything lives in one directory (`Settings.pki_dir`, default `data_dir/pki`), created on first use::

    ca.key  ca.crt                      the fleet CA (ECDSA P-256); ca.key is 0600 and never leaves here
    broker.key  broker.crt              server certificate of the MQTT broker (SANs: its host names)
    coordinator.key  coordinator.crt    the coordinator's client identity on the broker
    coordinators/<replica>.key .crt     each replica's own client identity (`Settings.replicated`; CN
                                        `edgefleet:coordinator.<replica>`, issued at the replica's first start)
    superlink.key  superlink.crt        server certificate of the Flower SuperLink (federated learning only)
    crl.pem                             revoked device certificates (Mosquitto `crlfile`, the embedded broker)
    issued/<serial>.crt                 every device certificate issued (the coordinator derives a device's
                                        SuperNode key from it; certificates are public, the directory is not)

Keys are written 0600 inside a 0700 directory, through a temp file and `os.replace`.
"""

from __future__ import annotations

import ipaddress
import os
import socket
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from cloud.broker_rights import replica_identity
from cloud.errors import InvalidInputError
from protocol.identity import COORDINATOR_IDENTITY, COORDINATOR_OU, DEVICE_OU, DEVICE_URI_PREFIX

__all__ = ["FleetPki", "IssuedCertificate", "pem_public_key", "private_write"]

_ORG = "edgefleet"
_CA_DAYS = 3650
_SERVER_DAYS = 825
_REISSUE_BEFORE = timedelta(days=30)  # a server certificate this close to expiry is issued anew at start
_BACKDATE = timedelta(minutes=5)  # tolerate devices whose clock is a little behind
_CRL_DAYS = 7
_ISSUED = "issued"
_REPLICAS = "coordinators"


@dataclass(frozen=True)
class IssuedCertificate:
    """A certificate the CA issued: PEM, serial (hex) and expiry."""

    pem: str
    serial: str
    not_after: datetime


def private_write(path: Path, data: bytes) -> None:
    """Write `data` to `path` with mode 0600 from the start (temp file + `os.replace`)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def pem_public_key(pem: str | bytes) -> bytes:
    """The DER SubjectPublicKeyInfo of a PEM certificate or CSR (to compare keys)."""
    data = pem.encode() if isinstance(pem, str) else pem
    loaded: x509.Certificate | x509.CertificateSigningRequest
    loaded = x509.load_pem_x509_csr(data) if b"CERTIFICATE REQUEST" in data else x509.load_pem_x509_certificate(data)
    return loaded.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(common_name: str, unit: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, _ORG),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, unit),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


class FleetPki:
    """The CA in `directory`; `ensure()` creates what is missing (CA, broker and coordinator certificates)."""

    def __init__(self, directory: Path, *, broker_hostnames: Iterable[str] = ()) -> None:
        self.directory = directory
        self._hostnames = list(broker_hostnames)
        self._ca_key: ec.EllipticCurvePrivateKey | None = None
        self._ca_cert: x509.Certificate | None = None

    # -- files ---------------------------------------------------------------------------------------

    @property
    def ca_path(self) -> Path:
        """The CA certificate (PEM) devices and brokers trust."""
        return self.directory / "ca.crt"

    @property
    def crl_path(self) -> Path:
        """The certificate revocation list (PEM)."""
        return self.directory / "crl.pem"

    def broker_files(self) -> tuple[Path, Path]:
        """`(certificate, key)` of the broker's server identity."""
        return self.directory / "broker.crt", self.directory / "broker.key"

    def coordinator_files(self) -> tuple[Path, Path]:
        """`(certificate, key)` of the coordinator's client identity on the broker."""
        return self.directory / "coordinator.crt", self.directory / "coordinator.key"

    def replica_files(self, replica: str) -> tuple[Path, Path]:
        """`(certificate, key)` of coordinator replica `replica`'s own client identity on the broker, issued when
        missing or about to expire; `ValueError` for a name that cannot be a CN (`replica_identity`).

        Replicas share the data directory (the CA) but not a certificate: Mosquitto makes the CN the client id, so
        replicas sharing one would take each other's session over.
        """
        common_name = replica_identity(replica)
        cert_path = self.directory / _REPLICAS / f"{replica}.crt"
        key_path = self.directory / _REPLICAS / f"{replica}.key"
        if not cert_path.exists() or not key_path.exists() or _expiring(cert_path):

            def build(public_key: object) -> x509.Certificate:
                return self._coordinator_certificate(public_key, common_name=common_name)

            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._write_leaf(cert_path, key_path, build)
        return cert_path, key_path

    def superlink_files(self, hostnames: Iterable[str] = ()) -> tuple[Path, Path]:
        """`(certificate, key)` of the Flower SuperLink's server identity, issued when missing, about to expire, or
        not covering the broker's host names and `hostnames` (the names devices reach the SuperLink at)."""
        cert_path, key_path = self.directory / "superlink.crt", self.directory / "superlink.key"
        names = sorted({*self._hostnames, *hostnames})
        if not cert_path.exists() or not key_path.exists() or not _current(cert_path, names):

            def build(public_key: object) -> x509.Certificate:
                return self._server_certificate(public_key, names=names, role="superlink")

            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._write_leaf(cert_path, key_path, build)
        return cert_path, key_path

    def issued_certificate(self, serial: str) -> x509.Certificate | None:
        """The device certificate issued with `serial` (hex), None if this CA kept no copy (issued before it did)."""
        try:
            return x509.load_pem_x509_certificate((self.directory / _ISSUED / f"{serial}.crt").read_bytes())
        except FileNotFoundError:
            return None

    def ca_pem(self) -> str:
        """The CA certificate as PEM text."""
        self._load_ca()
        return self.ca_path.read_text()

    # -- set-up --------------------------------------------------------------------------------------

    def ensure(self) -> FleetPki:
        """Create the CA, the broker and coordinator certificates and an empty CRL where missing."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.directory, 0o700)
        self._load_ca()
        cert_path, key_path = self.broker_files()
        if not cert_path.exists() or not key_path.exists() or not self._covers_hostnames(cert_path):
            self._write_leaf(cert_path, key_path, self._server_certificate)
        cert_path, key_path = self.coordinator_files()
        if not cert_path.exists() or not key_path.exists():
            self._write_leaf(cert_path, key_path, self._coordinator_certificate)
        if not self.crl_path.exists():
            self.write_crl([])
        return self

    def _load_ca(self) -> None:
        if self._ca_key is not None:
            return
        key_path = self.directory / "ca.key"
        if key_path.exists() and self.ca_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
            assert isinstance(key, ec.EllipticCurvePrivateKey)
            self._ca_key, self._ca_cert = key, x509.load_pem_x509_certificate(self.ca_path.read_bytes())
            return
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.now(UTC)
        subject = _name("edgefleet fleet CA", "ca")
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=_CA_DAYS))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(_key_usage(ca=True), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        private_write(key_path, _key_pem(key))
        private_write(self.ca_path, cert.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.ca_path, 0o644)
        self._ca_key, self._ca_cert = key, cert

    def _write_leaf(self, cert_path: Path, key_path: Path, build: object) -> None:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = build(key.public_key())  # type: ignore[operator]
        private_write(key_path, _key_pem(key))
        private_write(cert_path, cert.public_bytes(serialization.Encoding.PEM))

    def _covers_hostnames(self, cert_path: Path) -> bool:
        return _covers(x509.load_pem_x509_certificate(cert_path.read_bytes()), self._hostnames)

    # -- issuing -------------------------------------------------------------------------------------

    def _builder(self, subject: x509.Name, public_key: object, days: float) -> x509.CertificateBuilder:
        self._load_ca()
        assert self._ca_cert is not None and self._ca_key is not None
        now = datetime.now(UTC)
        return (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(self._ca_cert.subject)
            .public_key(public_key)  # type: ignore[arg-type]
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(_key_usage(ca=False), critical=True)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )

    def _sign(self, builder: x509.CertificateBuilder) -> x509.Certificate:
        assert self._ca_key is not None
        return builder.sign(self._ca_key, hashes.SHA256())

    def _server_certificate(
        self, public_key: object, *, names: Iterable[str] | None = None, role: str = "broker"
    ) -> x509.Certificate:
        extra = self._hostnames if names is None else names
        names = sorted({"localhost", "127.0.0.1", "::1", socket.gethostname(), *extra})
        alt: list[x509.GeneralName] = []
        for name in names:
            try:
                alt.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                alt.append(x509.DNSName(name))
        builder = self._builder(_name(f"edgefleet {role}", role), public_key, _SERVER_DAYS)
        builder = builder.add_extension(x509.SubjectAlternativeName(alt), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        return self._sign(builder)

    def _coordinator_certificate(
        self, public_key: object, *, common_name: str = COORDINATOR_IDENTITY
    ) -> x509.Certificate:
        builder = self._builder(_name(common_name, COORDINATOR_OU), public_key, _SERVER_DAYS)
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        return self._sign(builder)

    def issue_device_certificate(self, device_id: str, csr_pem: str, *, days: float) -> IssuedCertificate:
        """A client certificate for `device_id` over the CSR's key; `InvalidInputError` for a bad CSR.

        The subject is set here from the enrolled id (whatever the CSR asks for), so a device cannot name itself.
        """
        try:
            csr = x509.load_pem_x509_csr(csr_pem.encode())
        except ValueError as exc:
            raise InvalidInputError(
                f"csr_pem is not a PEM certificate signing request: {exc}", field="csr_pem"
            ) from exc
        if not csr.is_signature_valid:
            raise InvalidInputError("the CSR's signature does not verify", field="csr_pem")
        key = csr.public_key()
        if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.key_size < 256:
            raise InvalidInputError("the CSR's key must be an EC key of at least 256 bits (P-256)", field="csr_pem")
        builder = self._builder(_name(device_id, DEVICE_OU), key, days)
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(f"{DEVICE_URI_PREFIX}{device_id}")]),
            critical=False,
        )
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        cert = self._sign(builder)
        serial = format(cert.serial_number, "x")
        # Kept so that a device's public key can be derived later (its SuperNode identity for federated learning).
        private_write(self.directory / _ISSUED / f"{serial}.crt", cert.public_bytes(serialization.Encoding.PEM))
        return IssuedCertificate(
            pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
            serial=serial,
            not_after=cert.not_valid_after_utc,
        )

    # -- revocation ----------------------------------------------------------------------------------

    def write_crl(self, revoked: Iterable[tuple[str, datetime]]) -> None:
        """Write the CRL listing `(serial hex, revoked at)` pairs; brokers read it on the next connect."""
        self._load_ca()
        assert self._ca_cert is not None and self._ca_key is not None
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self._ca_cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + timedelta(days=_CRL_DAYS))
            .add_extension(x509.CRLNumber(int(now.timestamp() * 1000)), critical=False)
            .add_extension(
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._ca_key.public_key()), critical=False
            )
        )
        for serial, when in revoked:
            entry = x509.RevokedCertificateBuilder().serial_number(int(serial, 16)).revocation_date(when).build()
            builder = builder.add_revoked_certificate(entry)
        crl = builder.sign(self._ca_key, hashes.SHA256())
        private_write(self.crl_path, crl.public_bytes(serialization.Encoding.PEM))
        os.chmod(self.crl_path, 0o644)


def _covers(cert: x509.Certificate, hostnames: Iterable[str]) -> bool:
    """True if `cert`'s SANs name every one of `hostnames` (IP addresses compared as addresses)."""
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    present = {str(v) for v in san.get_values_for_type(x509.DNSName)}
    present |= {str(v) for v in san.get_values_for_type(x509.IPAddress)}
    return all(_canonical(h) in present for h in hostnames)


def _canonical(name: str) -> str:
    """An IP address in its compressed form (as the SAN reads back), a DNS name as it is."""
    try:
        return str(ipaddress.ip_address(name))
    except ValueError:
        return name


def _current(cert_path: Path, hostnames: Iterable[str]) -> bool:
    """True if the certificate at `cert_path` covers `hostnames` and is not close to expiring."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc - _REISSUE_BEFORE > datetime.now(UTC) and _covers(cert, hostnames)


def _expiring(cert_path: Path) -> bool:
    """True if the certificate at `cert_path` expires within `_REISSUE_BEFORE`."""
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    return cert.not_valid_after_utc - _REISSUE_BEFORE <= datetime.now(UTC)


def _authority_key_id(ca_key: ec.EllipticCurvePrivateKey) -> x509.AuthorityKeyIdentifier:
    return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key())


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not ca,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )
