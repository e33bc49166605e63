"""Alert webhooks: the signature, the backoff, and delivering the persisted delivery rows that are due.

Every alert event becomes one `AlertDelivery` row per configured URL (in the transaction of the event), with
the exact JSON body to send. `deliver_due` POSTs the due ones with::

    X-Edgefleet-Event: alert.opened | alert.resolved | alert.acked
    X-Edgefleet-Delivery: <delivery id>              (the same on every attempt: receivers de-duplicate on it)
    X-Edgefleet-Timestamp: <unix seconds of this attempt>
    X-Edgefleet-Signature: sha256=<hex HMAC-SHA256 of "<timestamp>.<body>" keyed with alert_webhook_secret>

A 2xx answer delivers it. Anything else (another status, a refused connection, a timeout) is retried after
`backoff_s(attempt)`: `alert_webhook_backoff_s` doubled per attempt, capped at `alert_webhook_backoff_max_s`,
times a jitter in [0.5, 1]; after `alert_webhook_max_attempts` attempts the delivery is marked failed, logged,
counted and audited. A delivery is claimed (its attempt counted, its next attempt pushed past the timeout) in
the database before it is sent, so coordinators sharing a database never send the same attempt twice and a
coordinator killed mid-send retries it after a restart.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from urllib.parse import urlsplit

import httpx
from sqlalchemy import update
from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud import audit
from cloud.models import AlertDelivery, DeliveryState
from cloud.settings import Settings

__all__ = [
    "DeliveryCounters",
    "backoff_s",
    "deliver_due",
    "redact_url",
    "sign",
    "signature_headers",
]

log = logging.getLogger(__name__)

ACTOR = "coordinator"  # who opens and resolves alerts, and gives up deliveries, in the audit log
_BATCH = 50
_ERROR_CHARS = 1000


def sign(secret: str, timestamp: int, body: bytes) -> str:
    """`sha256=<hex>`: the HMAC-SHA256 of `"<timestamp>.<body>"` keyed with `secret`."""
    mac = hmac.new(secret.encode(), str(timestamp).encode() + b"." + body, hashlib.sha256)
    return f"sha256={mac.hexdigest()}"


def signature_headers(*, secret: str, event: str, delivery_id: str, timestamp: int, body: bytes) -> dict[str, str]:
    """The headers of one attempt."""
    return {
        "Content-Type": "application/json",
        "User-Agent": "edgefleet-alerts",
        "X-Edgefleet-Event": event,
        "X-Edgefleet-Delivery": delivery_id,
        "X-Edgefleet-Timestamp": str(timestamp),
        "X-Edgefleet-Signature": sign(secret, timestamp, body),
    }


def backoff_s(attempt: int, *, base_s: float, max_s: float, jitter: float = 1.0) -> float:
    """The wait after failed attempt `attempt` (1 = the first): base · 2^(attempt-1), capped, times `jitter`."""
    if attempt < 1:
        raise ValueError(f"attempts count from 1, got {attempt}")
    return min(max_s, base_s * 2.0 ** min(attempt - 1, 60)) * jitter


def redact_url(url: str) -> str:
    """`url` without user name and password (what logs and the API show)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port is not None:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()


@dataclass
class DeliveryCounters:
    """Webhook deliveries since start: delivered, attempts that failed, deliveries given up."""

    delivered: int = 0
    failed_attempts: int = 0
    failed: int = 0
    last_error: dict[str, str] = field(default_factory=dict)  # redacted URL → its latest failure


def _claim(engine: Engine, row: AlertDelivery, now: datetime, lease: timedelta) -> bool:
    """Count the attempt and push the next one past this attempt's timeout; False if someone else claimed it."""
    with Session(engine) as session:
        claimed = session.exec(
            update(AlertDelivery)
            .where(
                col(AlertDelivery.id) == row.id,
                col(AlertDelivery.state) == DeliveryState.PENDING.value,
                col(AlertDelivery.attempts) == row.attempts,
            )
            .values(attempts=row.attempts + 1, next_attempt_at=now + lease)
        )
        session.commit()
    return bool(getattr(claimed, "rowcount", 0))


def _post(post: Callable[..., httpx.Response], settings: Settings, row: AlertDelivery, now: datetime) -> str | None:
    """One attempt; None when the receiver took it (2xx), else why not."""
    body = row.body.encode()
    headers = signature_headers(
        secret=settings.alert_webhook_secret,
        event=row.event,
        delivery_id=row.delivery_id,
        timestamp=int(now.timestamp()),
        body=body,
    )
    try:
        response = post(row.url, content=body, headers=headers, timeout=settings.alert_webhook_timeout_s)
    except httpx.HTTPError as exc:
        return f"{type(exc).__name__}: {exc}"[:_ERROR_CHARS]
    if 200 <= response.status_code < 300:
        return None
    return f"HTTP {response.status_code}: {response.text.strip()[:200]}"


def _settle(
    engine: Engine, settings: Settings, row: AlertDelivery, error: str | None, now: datetime, rand: Callable[[], float]
) -> bool:
    """Store an attempt's outcome; True when the delivery failed for good."""
    attempts = row.attempts + 1
    with Session(engine) as session:
        stored = session.get(AlertDelivery, row.id)
        if stored is None:
            return False
        stored.last_error = error
        if error is None:
            stored.state, stored.delivered_at = DeliveryState.DELIVERED.value, now
        elif attempts >= settings.alert_webhook_max_attempts:
            stored.state = DeliveryState.FAILED.value
            session.add(stored)
            audit.record(
                session=session,
                actor=ACTOR,
                action="alert.delivery_failed",
                subject=f"alert:{row.alert_id}",
                details={"delivery": row.delivery_id, "event": row.event, "url": redact_url(row.url),
                         "attempts": attempts, "error": error},
            )  # fmt: skip
        else:
            wait = backoff_s(
                attempts,
                base_s=settings.alert_webhook_backoff_s,
                max_s=settings.alert_webhook_backoff_max_s,
                jitter=0.5 + 0.5 * rand(),
            )
            stored.next_attempt_at = now + timedelta(seconds=wait)
        session.add(stored)
        session.commit()
        return stored.state == DeliveryState.FAILED.value


def deliver_due(
    *,
    engine: Engine,
    settings: Settings,
    now: datetime,
    counters: DeliveryCounters,
    post: Callable[..., httpx.Response] = httpx.post,
    rand: Callable[[], float] = random.random,
) -> int:
    """Attempt every pending delivery that is due at `now` (oldest first); returns how many were attempted."""
    with Session(engine, expire_on_commit=False) as session:
        due = list(
            session.exec(
                select(AlertDelivery)
                .where(AlertDelivery.state == DeliveryState.PENDING.value, col(AlertDelivery.next_attempt_at) <= now)
                .order_by(col(AlertDelivery.id))
                .limit(_BATCH)
            )
        )
    lease = timedelta(seconds=settings.alert_webhook_timeout_s + 30)
    attempted = 0
    for row in due:
        if not _claim(engine, row, now, lease):
            continue
        attempted += 1
        error = _post(post, settings, row, now)
        shown = redact_url(row.url)
        if error is None:
            counters.delivered += 1
            log.info("alert webhook delivered delivery=%s event=%s url=%s", row.delivery_id, row.event, shown)
        else:
            counters.failed_attempts += 1
            counters.last_error[shown] = error
        if _settle(engine, settings, row, error, now, rand):
            counters.failed += 1
            log.error(
                "alert webhook failed for good delivery=%s event=%s url=%s attempts=%d: %s",
                row.delivery_id, row.event, shown, row.attempts + 1, error,
            )  # fmt: skip
        elif error is not None:
            log.warning("alert webhook attempt %d failed url=%s: %s", row.attempts + 1, shown, error)
    return attempted
