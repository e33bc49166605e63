"""API tokens: create (shown once), list, revoke, and resolve a presented bearer token to its principal."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, col, select

from cloud import audit
from cloud.auth import Principal, Role, new_token, token_digest, token_matches
from cloud.errors import ConflictError, InvalidInputError, NotFoundError
from cloud.models import ApiToken, as_utc
from protocol.messages import utcnow

__all__ = ["ADMIN_TOKEN_NAME", "authenticate_token", "create_token", "list_tokens", "revoke_token"]

ADMIN_TOKEN_NAME = "admin"  # the bootstrap admin token of data_dir/admin-token
_LAST_USED_RESOLUTION = timedelta(minutes=1)  # don't write a row on every request


def create_token(*, session: Session, name: str, role: Role, created_by: str) -> tuple[str, ApiToken]:
    """A new token `name` with `role`, audited as `created_by`; returns the secret (shown once) and the record."""
    if name == ADMIN_TOKEN_NAME:
        raise InvalidInputError(f"{ADMIN_TOKEN_NAME!r} is the bootstrap admin token's name", field="name")
    token = new_token("efa_")
    record = ApiToken(name=name, role=role.value, token_sha256=token_digest(token), created_by=created_by)
    session.add(record)
    try:
        session.flush()
    except IntegrityError as exc:
        session.rollback()
        raise ConflictError(f"a token named {name!r} exists already") from exc
    audit.record(session=session, actor=created_by, action="token.created", subject=name, details={"role": role.value})
    session.commit()
    session.refresh(record)
    return token, record


def list_tokens(*, session: Session) -> list[ApiToken]:
    """Every token (never the secrets), oldest first."""
    return list(session.exec(select(ApiToken).order_by(col(ApiToken.id))))


def revoke_token(*, session: Session, name: str, actor: str) -> ApiToken:
    """Revoke token `name` at once (audited as `actor` unless revoked already); `NotFoundError` if unknown."""
    record = session.exec(select(ApiToken).where(ApiToken.name == name)).first()
    if record is None:
        raise NotFoundError(f"token {name!r} does not exist")
    if record.revoked_at is None:
        record.revoked_at = utcnow()
        session.add(record)
        audit.record(session=session, actor=actor, action="token.revoked", subject=name, details={"role": record.role})
        session.commit()
    return record


def authenticate_token(*, session: Session, presented: str, admin_token: str) -> Principal | None:
    """The principal of a bearer token: the bootstrap admin, or a stored unrevoked token; else None."""
    if token_matches(presented, admin_token):
        return Principal(ADMIN_TOKEN_NAME, Role.ADMIN)
    record = session.exec(select(ApiToken).where(ApiToken.token_sha256 == token_digest(presented))).first()
    if record is None or record.revoked_at is not None:
        return None
    now = utcnow()
    last = as_utc(record.last_used_at)
    if last is None or now - last > _LAST_USED_RESOLUTION:
        record.last_used_at = now
        session.add(record)
        session.commit()
    return Principal(record.name, Role(record.role))
