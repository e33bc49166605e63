"""Identity: enrolment tokens, bootstrap secrets, device certificates, API tokens."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, json_column, when

__all__ = [
    "ApiToken",
    "ApiTokenPublic",
    "BootstrapSecret",
    "DeviceCertificate",
    "DeviceCertificatePublic",
    "EnrolmentToken",
]


class EnrolmentToken(SQLModel, table=True):
    """A one-time, expiring token that lets one device id enrol (only its sha256 is kept)."""

    __tablename__ = "enrolment_token"

    id: int | None = Field(default=None, primary_key=True)
    token_sha256: str = Field(unique=True, max_length=64)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = when()
    expires_at: datetime = when()
    used_at: datetime | None = when(nullable=True)


class BootstrapSecret(SQLModel, table=True):
    """A fleet-wide enrolment secret for factory provisioning: any new device id may enrol with it (weaker)."""

    __tablename__ = "bootstrap_secret"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    secret_sha256: str = Field(unique=True, max_length=64)
    tags: dict[str, str] = json_column(dict)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = when()
    expires_at: datetime | None = when(nullable=True)
    revoked_at: datetime | None = when(nullable=True)
    uses: int = 0


class DeviceCertificate(SQLModel, table=True):
    """A client certificate the fleet CA issued to a device (serial in hex)."""

    __tablename__ = "device_certificate"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    serial: str = Field(unique=True, max_length=64)
    public_key_sha256: str = Field(index=True, max_length=64)
    not_after: datetime = when()
    issued_at: datetime = when()
    revoked_at: datetime | None = when(nullable=True)


class DeviceCertificatePublic(UtcOut):
    """A device's certificate as `devices show` tells it (never the key)."""

    serial: str
    issued_at: datetime
    not_after: datetime
    revoked_at: datetime | None


class ApiToken(SQLModel, table=True):
    """A named API token with one role (only its sha256 is kept)."""

    __tablename__ = "api_token"

    id: int | None = Field(default=None, primary_key=True)
    name: str = Field(unique=True, max_length=128)
    role: str = Field(max_length=16)
    token_sha256: str = Field(unique=True, max_length=64)
    created_by: str = Field(default="", max_length=128)
    created_at: datetime = when()
    last_used_at: datetime | None = when(nullable=True)
    revoked_at: datetime | None = when(nullable=True)


class ApiTokenPublic(UtcOut):
    """A token as listings show it (never the secret)."""

    name: str
    role: str
    created_by: str
    created_at: datetime
    last_used_at: datetime | None
    revoked_at: datetime | None
