"""Who is calling the API: roles, scoped tokens, the bootstrap admin token, and per-download artifact tokens.

Roles (a token has exactly one; `admin` may do everything):

| role        | may                                                                  |
|-------------|----------------------------------------------------------------------|
| `viewer`    | read everything (every GET)                                          |
| `publisher` | read, push and delete models and variants, set aliases (e.g. from CI) |
| `operator`  | read, deploy, run rollouts, enrol, revoke and decommission devices  |
|             | (also: federated runs, acknowledging alerts, continuous-training      |
|             | policies and their approvals)                                         |
| `approver`  | read, approve high-risk models (governance)                          |
| `admin`     | everything, including API tokens and bootstrap secrets               |

Tokens are random (`eft_`/`efb_`/`efa_` prefixed), shown once, and stored as sha256 only. The admin token in
`data_dir/admin-token` (or `EDGEFLEET_ADMIN_TOKEN`) is the bootstrap `admin`. Devices never hold an API
token: they enrol with a one-time token, and fetch artifacts through URLs that carry an HMAC bound to the
device and the digest (`artifact_token`), checked against the device's enrolment at every download.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = [
    "Principal",
    "Role",
    "allowed",
    "artifact_token",
    "ensure_admin_token",
    "ensure_secret",
    "new_token",
    "token_digest",
    "token_matches",
]

TOKEN_FILE = "admin-token"


class Role(StrEnum):
    """What a token may do (see the module docstring)."""

    ADMIN = "admin"
    OPERATOR = "operator"
    PUBLISHER = "publisher"
    APPROVER = "approver"
    VIEWER = "viewer"


@dataclass(frozen=True)
class Principal:
    """An authenticated caller: the token's name and role."""

    name: str
    role: Role


def allowed(role: Role, required: frozenset[Role]) -> bool:
    """Whether `role` may call a route that requires one of `required` (empty: any authenticated role)."""
    return role is Role.ADMIN or not required or role in required


def new_token(prefix: str) -> str:
    """A fresh random token with a recognisable prefix (e.g. `efa_` API, `eft_` enrolment, `efb_` bootstrap)."""
    return f"{prefix}{secrets.token_urlsafe(32)}"


def token_digest(token: str) -> str:
    """The sha256 under which a token is stored (tokens are random, so no salt is needed)."""
    return hashlib.sha256(token.encode()).hexdigest()


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented bearer token with an expected one."""
    if not presented or not expected:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())


def artifact_token(secret: bytes, device_id: str, sha256: str) -> str:
    """The download token of artifact `sha256` for `device_id` (HMAC-SHA256, hex)."""
    return hmac.new(secret, f"artifact|{device_id}|{sha256}".encode(), hashlib.sha256).hexdigest()


def _write_private(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_suffix(".tmp")
    # Created with 0600 from the start, so the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    os.replace(tmp, path)


def ensure_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The stored admin token, creating it on first start; returns `(token, created)`."""
    path = data_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, False
    token = secrets.token_urlsafe(32)
    _write_private(path, token)
    return token, True


def ensure_secret(path: Path) -> bytes:
    """A 32-byte secret kept (hex, mode 0600) at `path`, created on first use."""
    if path.exists():
        text = path.read_text().strip()
        if len(text) >= 64:
            return bytes.fromhex(text)
    value = secrets.token_bytes(32)
    _write_private(path, value.hex())
    return value
