"""Alerts (one open alert per rule, cohort and model until resolved) and their webhook deliveries."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum

from sqlalchemy import JSON, Column, Text, UniqueConstraint
from sqlmodel import Field, SQLModel

from cloud.models._common import UtcOut, when

__all__ = [
    "Alert",
    "AlertBase",
    "AlertDelivery",
    "AlertDeliveryPublic",
    "AlertDetailPublic",
    "AlertPublic",
    "AlertRuleOverride",
    "AlertState",
    "AlertsPublic",
    "DeliveryState",
]


class AlertState(StrEnum):
    """Open (condition holds), acked (holds, someone is on it), resolved (gone)."""

    OPEN = "open"
    ACKED = "acked"
    RESOLVED = "resolved"


class DeliveryState(StrEnum):
    """A webhook delivery: waiting for its (next) attempt, delivered (2xx), or failed after its last attempt."""

    PENDING = "pending"
    DELIVERED = "delivered"
    FAILED = "failed"


class AlertBase(SQLModel):
    """What an alert is about: the rule it breaks, in which cohort, for which model, and how badly."""

    rule: str = Field(index=True, max_length=64)
    cohort: str = Field(max_length=256)  # fleet | device=<id> | <tag>=<value> | rollout=<id>
    model_name: str | None = Field(default=None, index=True, max_length=128)
    severity: str = Field(default="warning", max_length=16)
    state: str = Field(default=AlertState.OPEN.value, index=True, max_length=16)
    message: str = Field(default="", max_length=1024)
    threshold: float
    first_value: float
    last_value: float


class Alert(AlertBase, table=True):
    """One occurrence of a condition; `open_key` (rule|cohort|model) is set while unresolved, unique."""

    id: int | None = Field(default=None, primary_key=True)
    # NULL once resolved: NULLs never collide, so the database itself keeps one unresolved alert per key.
    open_key: str | None = Field(default=None, unique=True, max_length=512)
    misses: int = 0  # evaluations in a row without the condition (resolved at `alert_resolve_after`)
    opened_at: datetime = when()
    last_seen_at: datetime = when()
    resolved_at: datetime | None = when(nullable=True)
    acked_at: datetime | None = when(nullable=True)
    acked_by: str | None = Field(default=None, max_length=160)
    ack_note: str | None = Field(default=None, max_length=1000)


class AlertPublic(AlertBase, UtcOut):
    """An alert as the API shows it."""

    id: int
    opened_at: datetime
    last_seen_at: datetime
    resolved_at: datetime | None
    acked_at: datetime | None
    acked_by: str | None
    ack_note: str | None


class AlertDeliveryPublic(UtcOut):
    """One webhook delivery of an alert event (the URL without credentials)."""

    delivery_id: str
    event: str
    url: str
    state: str
    attempts: int
    next_attempt_at: datetime
    last_error: str | None
    created_at: datetime
    delivered_at: datetime | None


class AlertDetailPublic(AlertPublic):
    """One alert with its webhook deliveries."""

    deliveries: list[AlertDeliveryPublic] = Field(default_factory=list)


class AlertsPublic(SQLModel):
    """A listing of alerts, newest first."""

    data: list[AlertPublic]
    count: int


class AlertDelivery(SQLModel, table=True):
    """An alert event to POST to one webhook URL; kept (with its exact body) until delivered or failed."""

    __tablename__ = "alert_delivery"

    id: int | None = Field(default=None, primary_key=True)
    delivery_id: str = Field(unique=True, max_length=64)  # X-Edgefleet-Delivery
    alert_id: int = Field(foreign_key="alert.id", index=True)
    event: str = Field(max_length=32)  # alert.opened | alert.resolved | alert.acked
    url: str = Field(max_length=2048)
    body: str = Field(sa_column=Column(Text, nullable=False))  # the JSON sent, byte for byte, on every attempt
    state: str = Field(default=DeliveryState.PENDING.value, index=True, max_length=16)
    attempts: int = 0
    next_attempt_at: datetime = when()
    last_error: str | None = Field(default=None, max_length=1024)
    created_at: datetime = when()
    delivered_at: datetime | None = when(nullable=True)


class AlertRuleOverride(SQLModel, table=True):
    """An operator's change to one alert rule, for one model or (`*`) the whole fleet: the rule switched off or
    on, and/or its thresholds (`{"threshold": 0.02}`) in place of the settings'. Unset fields fall through to the
    next level: the model's override, then the fleet's, then the settings."""

    __tablename__ = "alert_rule_override"
    __table_args__ = (UniqueConstraint("model_name", "rule", name="uq_alert_rule_override"),)

    id: int | None = Field(default=None, primary_key=True)
    model_name: str = Field(max_length=128)  # a model name, or `*` (cloud.alerts.rules.ANY_MODEL)
    rule: str = Field(max_length=64)
    enabled: bool | None = None  # None: as the level below says
    thresholds: dict[str, float] = Field(default_factory=dict, sa_column=Column(JSON, nullable=False))
    updated_by: str = Field(max_length=160)
    updated_at: datetime = when()
