"""Routes of alerts: list (state, rule, model), the rules as evaluated (settings and operators' overrides per model),
one alert with its deliveries, acknowledge; set and reset a rule's override (operator, audited)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from fastapi import APIRouter, Path, Query
from pydantic import BaseModel, Field

from cloud.alerts import Rule, ack_alert, get_alert, list_alerts
from cloud.alerts.service import effective_rules, reset_rule_override, set_rule_override
from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.models import AlertDetailPublic, AlertsPublic
from protocol.messages import utcnow

__all__ = ["AckBody", "AlertRulesPublic", "EffectiveRulePublic", "RuleOverrideBody", "router"]

router = APIRouter(tags=["alerts"])

AlertId = Annotated[int, Path(ge=1, description="Alert id.")]
RuleName = Annotated[str, Path(max_length=64, description="The rule, e.g. error_rate.")]
ModelQuery = Annotated[
    str | None,
    Query(
        max_length=128,
        pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$",
        description="The model the override is for; left out: fleet-wide (every model without its own).",
    ),
]


class AckBody(BaseModel):
    """What the operator acknowledging an alert wants on record."""

    note: str | None = Field(default=None, max_length=1000)


class ModelRulePublic(BaseModel):
    """A rule as it applies to one model with an override: its values and where each comes from."""

    model: str
    enabled: bool
    enabled_from: str = Field(description="`model`, `*` (the fleet-wide override) or `settings`.")
    threshold: float
    threshold_from: str = Field(description="`model`, `*` (the fleet-wide override) or `settings`.")
    updated_by: str
    updated_at: datetime


class EffectiveRulePublic(Rule):
    """A rule as evaluated fleet-wide (`threshold`, `enabled`: the settings' or the `*` override's), with the
    settings' threshold, and the models whose own override changes it."""

    settings_threshold: float
    enabled: bool = True
    enabled_from: str = "settings"
    threshold_from: str = "settings"
    models: list[ModelRulePublic] = Field(default_factory=list)


class RuleOverrideBody(BaseModel):
    """What to change of a rule: switch it off or on, and/or its threshold (what is left out stays as it was)."""

    enabled: bool | None = None
    threshold: float | None = None


class AlertRulesPublic(BaseModel):
    """The rules the coordinator evaluates, how often, and after how many quiet evaluations an alert resolves."""

    data: list[EffectiveRulePublic]
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
def rules(coordinator: CoordinatorDep, session: SessionDep) -> AlertRulesPublic:
    """Every rule with its metric, threshold and cohorts: the settings', changed by operators' overrides fleet-wide
    and per model (each value says where it comes from)."""
    settings = coordinator.settings
    return AlertRulesPublic(
        data=[EffectiveRulePublic.model_validate(r) for r in effective_rules(session=session, settings=settings)],
        tick_s=settings.alert_tick_s,
        resolve_after=settings.alert_resolve_after,
        webhooks=len(settings.alert_webhook_urls),
    )


@router.put("/alerts/rules/{rule}", dependencies=[requires(Role.OPERATOR)], summary="Override a rule for a model")
def put_rule(
    rule: RuleName,
    body: RuleOverrideBody,
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
    model: ModelQuery = None,
) -> AlertRulesPublic:
    """Switch the rule off or on, or set its threshold, for `model` (or fleet-wide); audited. 404 for an unknown
    rule (the answer lists the known ones), 422 for a threshold the rule cannot take. The rules as they now are."""
    settings = coordinator.settings
    set_rule_override(
        session=session, settings=settings, rule=rule, model=model, actor=principal.name,
        enabled=body.enabled, threshold=body.threshold,
    )  # fmt: skip
    return rules(coordinator, session)


@router.delete(
    "/alerts/rules/{rule}", dependencies=[requires(Role.OPERATOR)], summary="Remove a rule's override for a model"
)
def delete_rule(
    rule: RuleName, session: SessionDep, coordinator: CoordinatorDep, principal: PrincipalDep, model: ModelQuery = None
) -> AlertRulesPublic:
    """The fleet-wide override (or the settings) applies to `model` again; audited. 404 when it has none."""
    reset_rule_override(session=session, settings=coordinator.settings, rule=rule, model=model, actor=principal.name)
    return rules(coordinator, session)


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
