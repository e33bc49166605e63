"""Routes of device identity: enrolment tokens, enrolment and renewal, revocation, bootstrap secrets, the CA and CRL.

`public_router` holds what a device calls before it has anything but an enrolment token or its own key
(enrol, renew) and what brokers and devices fetch (CA certificate, CRL, where the broker and the Flower SuperLink
are); everything else needs a role.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Path
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, Field

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.errors import ConfigurationError, NotFoundError
from cloud.models import DevicePublic
from cloud.pki import IssuedCertificate
from cloud.services import devices, enrolment
from protocol.identity import BrokerLocation, EnrolmentRequest, EnrolmentResponse, RenewalRequest
from protocol.messages import DeviceId, Name

__all__ = ["public_router", "router"]

public_router = APIRouter(tags=["enrolment"])
router = APIRouter(tags=["enrolment"])

_OPERATOR = requires(Role.OPERATOR)
_ADMIN = requires(Role.ADMIN)
DevicePath = Annotated[DeviceId, Path(description="Device id.")]


class FederationLocation(BaseModel):
    """Where a device's Flower SuperNode connects, and the CA that signed the SuperLink's certificate."""

    superlink: str = Field(description="HOST:PORT of the SuperLink (`flower-supernode --superlink`).")
    root_certificates: str = Field(description="PEM of the CA that signed its certificate (`--root-certificates`).")


class EnrolmentTokenCreate(BaseModel):
    """The tags the device will carry (the coordinator's, not the device's) and how long the token lives."""

    tags: dict[str, str] = Field(default_factory=dict)
    ttl_seconds: float | None = Field(default=None, gt=0, le=90 * 24 * 3600)


class EnrolmentTokenCreated(BaseModel):
    """A one-time enrolment token (shown once) and the command a device runs with it."""

    device_id: str
    token: str
    expires_at: datetime
    command: str


class BootstrapSecretCreate(BaseModel):
    """A fleet-wide enrolment secret for factory provisioning, with the tags its devices get."""

    name: Name
    tags: dict[str, str] = Field(default_factory=dict)
    ttl_seconds: float | None = Field(default=None, gt=0)


class BootstrapSecretPublic(BaseModel):
    """A bootstrap secret as listings show it (never the secret)."""

    name: str
    tags: dict[str, str]
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    uses: int


class BootstrapSecretCreated(BootstrapSecretPublic):
    """A new bootstrap secret (shown once)."""

    secret: str


@router.post(
    "/devices/{device_id}/enrolment-token", status_code=201, dependencies=[_OPERATOR], summary="Enrol a device"
)
def create_enrolment_token(
    device_id: DevicePath,
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    body: EnrolmentTokenCreate | None = None,
) -> EnrolmentTokenCreated:
    """A one-time, expiring token with which the device `device_id` (and only it) enrols."""
    given = body or EnrolmentTokenCreate()
    token, record = enrolment.create_enrolment_token(
        session=session,
        device_id=device_id,
        tags=given.tags,
        ttl_s=given.ttl_seconds or coordinator.settings.enrolment_token_ttl_s,
        created_by=principal.name,
    )
    command = f"edgefleet-agent enroll --coordinator {coordinator.public_url} --device-id {device_id} --token {token}"
    return EnrolmentTokenCreated(device_id=device_id, token=token, expires_at=record.expires_at, command=command)


@router.post("/devices/{device_id}/revoke", dependencies=[_OPERATOR], summary="Revoke a device")
def revoke_device(
    device_id: DevicePath, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> DevicePublic:
    """Revoke the device's certificates (refused at its next connect), clear its retained state, log it."""
    enrolment.revoke_device(session=session, pki=coordinator.fleet_pki(), device_id=device_id, by=principal.name)
    coordinator.after_revocation(device_id)
    return devices.get_device(session=session, device_id=device_id)


def _broker_url(coordinator: CoordinatorDep) -> str:
    """The broker URL devices are told; checked before a token is spent on an enrolment that could not finish."""
    broker_url = coordinator.device_mqtt_url
    if broker_url is None:
        raise ConfigurationError("this coordinator runs without MQTT; devices cannot be told a broker")
    return broker_url


def _response(
    coordinator: CoordinatorDep, device_id: str, tags: dict[str, str], issued: IssuedCertificate
) -> EnrolmentResponse:
    broker_url = _broker_url(coordinator)
    return EnrolmentResponse(
        device_id=device_id,
        certificate_pem=issued.pem,
        ca_pem=coordinator.fleet_pki().ca_pem(),
        not_after=issued.not_after,
        broker_url=broker_url,
        topic_base=coordinator.settings.topic_base,
        coordinator_url=coordinator.public_url,
        tags=tags,
        tuf_root=coordinator.governance.root_json() if coordinator.governance is not None else None,
        tuf_url=f"{coordinator.public_url}/api/v1/tuf/metadata/",
    )


@public_router.post("/enrolment", summary="A device enrols: CSR + enrolment token → its certificate")
def enrol(request: EnrolmentRequest, session: SessionDep, coordinator: CoordinatorDep) -> EnrolmentResponse:
    """Check the one-time token (or the bootstrap secret), sign the CSR's key, and say where the broker is."""
    _broker_url(coordinator)
    device, issued = enrolment.enrol_device(
        session=session,
        pki=coordinator.fleet_pki(),
        request=request,
        days=coordinator.settings.device_certificate_days,
    )
    if coordinator.federation is not None:
        coordinator.federation.nudge()  # its key is registered with the SuperLink now rather than at the next tick
    return _response(coordinator, device.id, dict(device.tags), issued)


@public_router.post("/enrolment/renew", summary="A device renews its certificate (CSR of its current key)")
def renew(request: RenewalRequest, session: SessionDep, coordinator: CoordinatorDep) -> EnrolmentResponse:
    """A fresh certificate for the key of a current, unrevoked certificate of an enrolled device."""
    device, issued = enrolment.renew_certificate(
        session=session,
        pki=coordinator.fleet_pki(),
        request=request,
        days=coordinator.settings.device_certificate_days,
    )
    if coordinator.federation is not None:
        coordinator.federation.nudge()  # a renewal with a new key registers the new key
    return _response(coordinator, device.id, dict(device.tags), issued)


@public_router.get("/enrolment/broker", summary="Where the fleet's broker is (agents ask again when it moved)")
def broker_location(coordinator: CoordinatorDep) -> BrokerLocation:
    """The broker URL and topic base devices use now (the same answer enrolment gives)."""
    return BrokerLocation(broker_url=_broker_url(coordinator), topic_base=coordinator.settings.topic_base)


@public_router.get(
    "/enrolment/federation", summary="Where the fleet's Flower SuperLink is (404 when federated learning is off)"
)
def federation_location(coordinator: CoordinatorDep) -> FederationLocation:
    """The SuperLink's address devices use and the PEM of the CA that signed its certificate."""
    federation = coordinator.federation
    if federation is None:
        raise NotFoundError("federated learning is not enabled on this coordinator")
    return FederationLocation(superlink=federation.device_address, root_certificates=federation.root_certificates())


@public_router.get("/pki/ca.pem", response_class=PlainTextResponse, summary="The fleet CA certificate")
def ca_certificate(coordinator: CoordinatorDep) -> str:
    """PEM of the CA that signs device, broker and coordinator certificates."""
    return coordinator.fleet_pki().ca_pem()


@public_router.get("/pki/crl.pem", response_class=PlainTextResponse, summary="The certificate revocation list")
def revocation_list(coordinator: CoordinatorDep) -> str:
    """PEM of the CRL (Mosquitto's `crlfile`; reload Mosquitto after a revocation)."""
    return coordinator.fleet_pki().crl_path.read_text()


@router.post("/bootstrap-secrets", status_code=201, dependencies=[_ADMIN], summary="Create a bootstrap secret")
def create_bootstrap_secret(
    body: BootstrapSecretCreate, session: SessionDep, principal: PrincipalDep
) -> BootstrapSecretCreated:
    """A fleet-wide secret for factory provisioning: any *new* device id may enrol with it (weaker than tokens)."""
    secret, record = enrolment.create_bootstrap_secret(
        session=session, name=body.name, tags=body.tags, ttl_s=body.ttl_seconds, created_by=principal.name
    )
    public = BootstrapSecretPublic.model_validate(record, from_attributes=True)
    return BootstrapSecretCreated(**public.model_dump(), secret=secret)


@router.get("/bootstrap-secrets", dependencies=[_ADMIN], summary="List bootstrap secrets")
def list_bootstrap_secrets(session: SessionDep) -> list[BootstrapSecretPublic]:
    """Every bootstrap secret (never the secret itself)."""
    return [
        BootstrapSecretPublic.model_validate(r, from_attributes=True)
        for r in enrolment.list_bootstrap_secrets(session=session)
    ]


@router.post("/bootstrap-secrets/{name}/revoke", dependencies=[_ADMIN], summary="Revoke a bootstrap secret")
def revoke_bootstrap_secret(
    name: Annotated[Name, Path()], session: SessionDep, principal: PrincipalDep
) -> BootstrapSecretPublic:
    """No more enrolments with this secret (devices enrolled with it stay)."""
    record = enrolment.revoke_bootstrap_secret(session=session, name=name, actor=principal.name)
    return BootstrapSecretPublic.model_validate(record, from_attributes=True)
