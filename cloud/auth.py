"""The admin token: generated once into `data_dir/admin-token` (mode 0600), checked on every write."""

from __future__ import annotations

import hmac
import os
import secrets
from pathlib import Path

__all__ = ["ensure_admin_token", "token_matches"]

TOKEN_FILE = "admin-token"


def ensure_admin_token(data_dir: Path) -> tuple[str, bool]:
    """The stored admin token, creating it on first start; returns `(token, created)`."""
    path = data_dir / TOKEN_FILE
    if path.exists():
        token = path.read_text().strip()
        if token:
            return token, False
    data_dir.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    tmp = path.with_suffix(".tmp")
    # Created with 0600 from the start, so the secret is never readable by others, not even briefly.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token + "\n")
    os.replace(tmp, path)
    return token, True


def token_matches(presented: str | None, expected: str) -> bool:
    """Constant-time comparison of a presented bearer token with the admin token."""
    if not presented:
        return False
    return hmac.compare_digest(presented.encode(), expected.encode())
