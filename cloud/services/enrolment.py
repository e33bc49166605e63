"""Which devices belong to the fleet: enrolment tokens, bootstrap secrets, certificates, renewal, revocation.

A device becomes `enrolled` only by presenting a one-time enrolment token an operator created for its id
(or the fleet's bootstrap secret, for factory provisioning) with a CSR; the fleet CA then issues its
certificate. Messages of devices that are not enrolled are ignored (`enrolled_device`). Revocation marks
the device and its certificates revoked and rewrites the CRL both brokers check on every connect.
"""

from __future__ import annotations

import hashlib
import logging
from datetime import timedelta

from sqlalchemy import select as sa_select
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud import audit
from cloud.auth import new_token, token_digest
from cloud.errors import ConflictError, InvalidInputError, NotFoundError, UnauthorizedError
from cloud.models import (
    BootstrapSecret,
    Device,
    DeviceCertificate,
    DeviceEventRecord,
    EnrolmentState,
    EnrolmentToken,
    as_utc,
)
from cloud.pki import FleetPki, IssuedCertificate, pem_public_key
from protocol.identity import EnrolmentRequest, RenewalRequest
from protocol.messages import utcnow

__all__ = [
    "UnknownDeviceError",
    "check_enrolled",
    "create_bootstrap_secret",
    "create_enrolment_token",
    "device_actor",
    "enrol_device",
    "enrolled_device",
    "list_bootstrap_secrets",
    "not_enrolled",
    "refresh_crl",
    "renew_certificate",
    "require_device",
    "revoke_bootstrap_secret",
    "revoke_device",
]

log = logging.getLogger(__name__)

_DEVICE = Device.__table__  # type: ignore[attr-defined]


class UnknownDeviceError(UnauthorizedError):
    """A message or request names a device that is not enrolled (never enrolled, pending or revoked)."""


def require_device(*, session: Session, device_id: str) -> Device:
    """The device `device_id` in any enrolment state; `NotFoundError` if the fleet does not know it."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not known (enrol it with `edgefleet devices enroll`)")
    return device


def enrolled_device(*, session: Session, device_id: str) -> Device:
    """The device if it is enrolled; `UnknownDeviceError` for an unknown, pending or revoked one."""
    device = session.get(Device, device_id)
    if device is None or device.enrolment != EnrolmentState.ENROLLED:
        raise UnknownDeviceError(not_enrolled(device_id, device.enrolment if device is not None else None))
    return device


def check_enrolled(*, session: Session, device_id: str) -> None:
    """`enrolled_device`'s check and errors, reading one column: for callers that need no Device row (an artifact
    download: loading the whole row, JSON columns and all, through the ORM was most of the download's time)."""
    statement = sa_select(_DEVICE.c.enrolment).where(_DEVICE.c.id == device_id)
    enrolment = session.connection().execute(statement).scalar_one_or_none()
    if enrolment != EnrolmentState.ENROLLED:
        raise UnknownDeviceError(not_enrolled(device_id, enrolment))


def not_enrolled(device_id: str, enrolment: str | None) -> str:
    """Why a device may not speak: never enrolled (`enrolment` None), or its enrolment state."""
    if enrolment is None:
        return f"device {device_id!r} is not enrolled"
    return f"device {device_id!r} is {enrolment}, not enrolled"


def _event(session: Session, device_id: str, kind: str, message: str) -> None:
    session.add(DeviceEventRecord(device_id=device_id, kind=kind, message=message))


def device_actor(device_id: str) -> str:
    """The audit log's actor for what a device does itself: `device:<id>`."""
    return f"device:{device_id}"


# -- enrolment tokens and bootstrap secrets --------------------------------------------------------


def create_enrolment_token(
    *, session: Session, device_id: str, tags: dict[str, str], ttl_s: float, created_by: str
) -> tuple[str, EnrolmentToken]:
    """A one-time token for `device_id` (pending until it enrols, with `tags`); `ConflictError` if enrolled."""
    device = session.get(Device, device_id)
    if device is not None and device.enrolment == EnrolmentState.ENROLLED:
        raise ConflictError(f"device {device_id!r} is enrolled already; revoke it first to enrol it again")
    if device is None:
        device = Device(id=device_id)
    device.enrolment = EnrolmentState.PENDING.value
    device.tags = dict(tags)
    device.revoked_at = device.decommissioned_at = None  # a retired id comes back as a new device
    session.add(device)
    token = new_token("eft_")
    now = utcnow()
    record = EnrolmentToken(
        token_sha256=token_digest(token),
        device_id=device_id,
        created_by=created_by,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s),
    )
    session.add(record)
    _event(session, device_id, "device.enrolment_token", f"enrolment token created by {created_by}")
    details = {"tags": dict(tags), "expires_at": record.expires_at.isoformat()}
    audit.record(
        session=session, actor=created_by, action="enrolment_token.created", subject=device_id, details=details
    )
    session.commit()
    session.refresh(record)
    return token, record


def create_bootstrap_secret(
    *, session: Session, name: str, tags: dict[str, str], ttl_s: float | None, created_by: str
) -> tuple[str, BootstrapSecret]:
    """A fleet-wide secret any new device id may enrol with (tags applied); `ConflictError` if `name` exists."""
    if session.exec(select(BootstrapSecret).where(BootstrapSecret.name == name)).first() is not None:
        raise ConflictError(f"a bootstrap secret named {name!r} exists already")
    secret = new_token("efb_")
    now = utcnow()
    record = BootstrapSecret(
        name=name,
        secret_sha256=token_digest(secret),
        tags=dict(tags),
        created_by=created_by,
        created_at=now,
        expires_at=now + timedelta(seconds=ttl_s) if ttl_s else None,
    )
    session.add(record)
    details = {"tags": dict(tags), "expires_at": record.expires_at.isoformat() if record.expires_at else None}
    audit.record(session=session, actor=created_by, action="bootstrap_secret.created", subject=name, details=details)
    session.commit()
    session.refresh(record)
    return secret, record


def list_bootstrap_secrets(*, session: Session) -> list[BootstrapSecret]:
    """Every bootstrap secret (hashes only), oldest first."""
    return list(session.exec(select(BootstrapSecret).order_by(col(BootstrapSecret.id))))


def revoke_bootstrap_secret(*, session: Session, name: str, actor: str) -> BootstrapSecret:
    """Stop a bootstrap secret from enrolling more devices (those enrolled with it stay); audited as `actor`."""
    record = session.exec(select(BootstrapSecret).where(BootstrapSecret.name == name)).first()
    if record is None:
        raise NotFoundError(f"bootstrap secret {name!r} does not exist")
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        session.add(record)
        audit.record(
            session=session, actor=actor, action="bootstrap_secret.revoked", subject=name, details={"uses": record.uses}
        )
        session.commit()
    return record


# -- enrolment and renewal ---------------------------------------------------------------------------


def _use_token(session: Session, request: EnrolmentRequest) -> Device:
    assert request.token is not None
    record = session.exec(
        select(EnrolmentToken).where(EnrolmentToken.token_sha256 == token_digest(request.token))
    ).first()
    if record is None or record.device_id != request.device_id:
        raise UnauthorizedError(f"the enrolment token is not valid for device {request.device_id!r}")
    if record.used_at is not None:
        raise UnauthorizedError("the enrolment token has been used already (tokens are one-time)")
    expires = as_utc(record.expires_at)
    if expires is not None and expires <= utcnow():
        raise UnauthorizedError(f"the enrolment token expired at {expires.isoformat()}; ask for a new one")
    device = require_device(session=session, device_id=request.device_id)
    if device.enrolment != EnrolmentState.PENDING:
        raise UnauthorizedError(f"device {request.device_id!r} is {device.enrolment}; its token no longer applies")
    record.used_at = utcnow()
    session.add(record)
    return device


def _use_bootstrap_secret(session: Session, request: EnrolmentRequest) -> tuple[Device, str]:
    assert request.bootstrap_secret is not None
    record = session.exec(
        select(BootstrapSecret).where(BootstrapSecret.secret_sha256 == token_digest(request.bootstrap_secret))
    ).first()
    expires = as_utc(record.expires_at) if record is not None else None
    if record is None or record.revoked_at is not None or (expires is not None and expires <= utcnow()):
        raise UnauthorizedError("the bootstrap secret is not valid (unknown, revoked or expired)")
    if session.get(Device, request.device_id) is not None:
        # Claiming an id the fleet already knows (enrolled, pending an operator's token, or revoked) needs a token.
        raise UnauthorizedError(f"device id {request.device_id!r} is taken; enrol it with its own enrolment token")
    record.uses += 1
    session.add(record)
    device = Device(id=request.device_id, tags=dict(record.tags))
    session.add(device)
    return device, record.name


def _issue(session: Session, pki: FleetPki, device: Device, csr_pem: str, days: float) -> IssuedCertificate:
    issued = pki.issue_device_certificate(device.id, csr_pem, days=days)
    session.add(
        DeviceCertificate(
            device_id=device.id,
            serial=issued.serial,
            public_key_sha256=hashlib.sha256(pem_public_key(csr_pem)).hexdigest(),
            not_after=issued.not_after,
        )
    )
    return issued


def enrol_device(
    *, session: Session, pki: FleetPki, request: EnrolmentRequest, days: float
) -> tuple[Device, IssuedCertificate]:
    """Check the token (or bootstrap secret), issue the device's certificate, mark it enrolled; one transaction."""
    if (request.token is None) == (request.bootstrap_secret is None):
        raise InvalidInputError("give exactly one of token and bootstrap_secret", field="token")
    secret_name: str | None = None
    if request.token:
        device = _use_token(session, request)
    else:
        device, secret_name = _use_bootstrap_secret(session, request)
    session.flush()
    issued = _issue(session, pki, device, request.csr_pem, days)
    device.enrolment = EnrolmentState.ENROLLED.value
    device.enrolled_at = utcnow()
    session.add(device)
    how = "enrolment token" if request.token else "bootstrap secret"
    _event(session, device.id, "device.enrolled", f"enrolled with a {how}; certificate {issued.serial}")
    details = {"via": how.replace(" ", "_"), "bootstrap_secret": secret_name, "serial": issued.serial}
    audit.record(
        session=session, actor=device_actor(device.id), action="device.enrolled", subject=device.id, details=details
    )
    session.commit()
    session.refresh(device)
    log.info("device enrolled device=%s serial=%s via=%s", device.id, issued.serial, how)
    return device, issued


def renew_certificate(
    *, session: Session, pki: FleetPki, request: RenewalRequest, days: float
) -> tuple[Device, IssuedCertificate]:
    """A fresh certificate for the key of a current certificate of an enrolled device (the CSR proves the key)."""
    device = enrolled_device(session=session, device_id=request.device_id)
    try:
        key_hash = hashlib.sha256(pem_public_key(request.csr_pem)).hexdigest()
    except ValueError as exc:
        raise InvalidInputError(f"csr_pem is not a PEM certificate request: {exc}", field="csr_pem") from exc
    now = utcnow()
    current = [
        c
        for c in session.exec(
            select(DeviceCertificate).where(
                DeviceCertificate.device_id == device.id, DeviceCertificate.public_key_sha256 == key_hash
            )
        )
        if c.revoked_at is None and (as_utc(c.not_after) or now) > now
    ]
    if not current:
        raise UnauthorizedError(
            f"no current certificate of device {device.id!r} holds this key; an expired device enrols again"
        )
    issued = _issue(session, pki, device, request.csr_pem, days)
    _event(session, device.id, "device.certificate_renewed", f"certificate {issued.serial} issued")
    details = {"serial": issued.serial, "not_after": issued.not_after.isoformat()}
    audit.record(
        session=session,
        actor=device_actor(device.id),
        action="device.certificate_renewed",
        subject=device.id,
        details=details,
    )
    session.commit()
    return device, issued


# -- revocation ------------------------------------------------------------------------------------


def revoke_device(*, session: Session, pki: FleetPki, device_id: str, by: str) -> Device:
    """Revoke a device and all its certificates, forget its desired state, rewrite the CRL."""
    device = require_device(session=session, device_id=device_id)
    now = utcnow()
    if device.enrolment != EnrolmentState.DECOMMISSIONED:  # a retired device stays out of the fleet
        device.enrolment = EnrolmentState.REVOKED.value
    device.revoked_at = now
    device.desired_state = None
    device.status = "offline"
    session.add(device)
    serials = []
    for cert in session.exec(select(DeviceCertificate).where(DeviceCertificate.device_id == device_id)):
        if cert.revoked_at is None:
            cert.revoked_at = now
            session.add(cert)
            serials.append(cert.serial)
    _event(session, device_id, "device.revoked", f"revoked by {by}")
    audit.record(
        session=session, actor=by, action="device.revoked", subject=device_id, details={"certificates": serials}
    )
    session.commit()
    _write_crl(session, pki)
    session.refresh(device)
    log.warning("device revoked device=%s by=%s", device_id, by)
    return device


def _write_crl(session: Session, pki: FleetPki) -> None:
    revoked = session.exec(select(DeviceCertificate).where(col(DeviceCertificate.revoked_at).is_not(None)))
    pki.write_crl((c.serial, as_utc(c.revoked_at) or utcnow()) for c in revoked)


def refresh_crl(*, engine: Engine, pki: FleetPki) -> None:
    """Rewrite the CRL from the database (at start-up: it is the source of truth, the file a copy)."""
    with Session(engine) as session:
        _write_crl(session, pki)
