"""Routes of alerts: list (state, rule, model), the configured rules, one alert with its deliveries, acknowledge."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from cloud.alerts import Rule, ack_alert, configured_rules, get_alert, list_alerts
from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.models import AlertDetailPublic, AlertsPublic
from protocol.messages import utcnow

__all__ = ["AckBody", "AlertRulesPublic", "router"]

router = APIRouter(tags=["alerts"])

AlertId = Annotated[int, Path(ge=1, description="Alert id.")]


class AckBody(BaseModel):
    """What the operator acknowledging an alert wants on record."""

    note: str | None = Field(default=None, max_length=1000)


class AlertRulesPublic(BaseModel):
    """The rules the coordinator evaluates, how often, and after how many quiet evaluations an alert resolves."""

    data: list[Rule]
    tick_s: float
    resolve_after: int
    webhooks: int


@router.get("/alerts", summary="List alerts, newest first")
def list_all(
    session: SessionDep,
    state: Annotated[
        Literal["open", "acked", "resolved", "unresolved", "all"],
        Query(description="`unresolved`: open or acked."),
    ] = "all",
    rule: Annotated[str | None, Query(max_length=64)] = None,
    model: Annotated[str | None, Query(max_length=128)] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> AlertsPublic:
    """Alerts of one state, rule and model (all by default)."""
    data = list_alerts(session=session, state=state, rule=rule, model=model, limit=limit)
    return AlertsPublic(data=data, count=len(data))


@router.get("/alerts/rules", summary="The alert rules evaluated")
def rules(coordinator: CoordinatorDep) -> AlertRulesPublic:
    """Every rule with its metric, threshold and cohorts (from the coordinator's settings)."""
    settings = coordinator.settings
    return AlertRulesPublic(
        data=configured_rules(settings),
        tick_s=settings.alert_tick_s,
        resolve_after=settings.alert_resolve_after,
        webhooks=len(settings.alert_webhook_urls),
    )


@router.get("/alerts/{alert_id}", summary="One alert with its webhook deliveries")
def get_one(alert_id: AlertId, session: SessionDep) -> AlertDetailPublic:
    """The alert, and every webhook delivery of its events (URLs without credentials)."""
    return get_alert(session=session, alert_id=alert_id)


@router.post("/alerts/{alert_id}/ack", dependencies=[requires(Role.OPERATOR)], summary="Acknowledge an alert")
def ack(
    alert_id: AlertId, body: AckBody, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep
) -> AlertDetailPublic:
    """Mark an open alert acknowledged by the caller (it still resolves when its condition goes); 409 if not open."""
    ack_alert(
        session=session,
        settings=coordinator.settings,
        alert_id=alert_id,
        actor=principal.name,
        note=body.note,
        now=utcnow(),
    )
    return get_alert(session=session, alert_id=alert_id)
