"""Alerts in the database: evaluate the rules and apply what `reconcile` decided, acknowledge, list and show.

`evaluate_alerts` reads every source, evaluates the configured rules, reconciles them with the unresolved
alerts and applies the result in ONE transaction: alerts opened, updated or resolved, an audit entry for each
one opened or resolved, and a webhook delivery row per configured URL for each event. `ack_alert` marks an
alert acknowledged (still unresolved) the same way. The unique `open_key` keeps one unresolved alert per
(rule, cohort, model) even between coordinators sharing a database: a racing second insert fails and that
evaluation is rolled back, to be retried at the next tick.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterable, Sequence
from datetime import datetime

from sqlalchemy.engine import Engine
from sqlmodel import Session, col, select

from cloud import audit
from cloud.alerts.drift import drift_rules
from cloud.alerts.rules import (
    ANY_MODEL,
    FLEET,
    Condition,
    OpenAlert,
    Reconciliation,
    Rule,
    RuleOverride,
    alert_key,
    effective_rule,
    evaluate,
    reconcile,
    threshold_problem,
)
from cloud.alerts.sources import ERROR_RATE, LATENCY_P95_MS, OFFLINE, ROLLOUT_STALLED_S, SOURCES, Source
from cloud.alerts.webhooks import ACTOR, redact_url
from cloud.errors import ConflictError, InvalidInputError, NotFoundError
from cloud.models import (
    Alert,
    AlertDelivery,
    AlertDeliveryPublic,
    AlertDetailPublic,
    AlertPublic,
    AlertRuleOverride,
    AlertState,
    DeliveryState,
)
from cloud.settings import Settings
from protocol.messages import utcnow

__all__ = [
    "ACTOR",
    "STATE_FILTERS",
    "ack_alert",
    "configured_rules",
    "effective_rules",
    "evaluate_alerts",
    "get_alert",
    "list_alerts",
    "load_overrides",
    "reset_rule_override",
    "set_rule_override",
]

log = logging.getLogger(__name__)

UNRESOLVED = (AlertState.OPEN.value, AlertState.ACKED.value)
STATE_FILTERS = ("open", "acked", "resolved", "unresolved", "all")


def configured_rules(settings: Settings) -> list[Rule]:
    """The rules of the settings' thresholds: error rate, p95 latency, devices offline, rollout stalled, drift and
    estimated accuracy (`cloud.alerts.drift`)."""
    by = settings.alert_group_by
    return [
        Rule(
            name="error_rate",
            metric=ERROR_RATE,
            threshold=settings.alert_error_rate,
            by=by,
            min_weight=settings.alert_min_inferences,
            severity="critical",
            description=f"errors / inferences over the last {settings.alert_window_s:g} s of telemetry",
        ),
        Rule(
            name="latency_p95",
            metric=LATENCY_P95_MS,
            threshold=settings.alert_latency_p95_ms,
            by=by,
            min_weight=settings.alert_min_inferences,
            description=f"p95 latency (ms) of the merged histograms of the last {settings.alert_window_s:g} s",
        ),
        Rule(
            name="devices_offline",
            metric=OFFLINE,
            op=">=",
            threshold=1,
            by=by,
            per_model=False,
            description=f"enrolled devices not online and not heard from for {settings.alert_offline_after_s:g} s",
        ),
        Rule(
            name="rollout_stuck",
            metric=ROLLOUT_STALLED_S,
            threshold=settings.alert_rollout_stuck_s,
            by=FLEET,  # each observation names its rollout as its cohort
            description="seconds a running rollout's state has not advanced (beyond a wait it planned)",
        ),
        *drift_rules(settings),
    ]


def _body(event: str, delivery_id: str, alert: Alert) -> str:
    payload = {
        "event": event,
        "delivery": delivery_id,
        "alert": AlertPublic.model_validate(alert, from_attributes=True).model_dump(mode="json"),
    }
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def _enqueue(session: Session, settings: Settings, event: str, alert: Alert, now: datetime) -> None:
    """One delivery row per configured webhook URL, in the caller's transaction."""
    assert alert.id is not None
    for url in settings.alert_webhook_urls:
        delivery_id = uuid.uuid4().hex
        session.add(
            AlertDelivery(
                delivery_id=delivery_id,
                alert_id=alert.id,
                event=event,
                url=url,
                body=_body(event, delivery_id, alert),
                next_attempt_at=now,
                created_at=now,
            )
        )


def _audit(session: Session, actor: str, action: str, alert: Alert, **details: object) -> None:
    audit.record(
        session=session,
        actor=actor,
        action=action,
        subject=f"alert:{alert.id}",
        details={"rule": alert.rule, "cohort": alert.cohort, "model": alert.model_name, **details},
    )


def _open(session: Session, condition: Condition, now: datetime) -> Alert:
    alert = Alert(
        rule=condition.rule,
        cohort=condition.cohort,
        model_name=condition.model,
        severity=condition.severity,
        message=condition.message[:1024],
        threshold=condition.threshold,
        first_value=condition.value,
        last_value=condition.value,
        open_key=condition.key,
        opened_at=now,
        last_seen_at=now,
    )
    session.add(alert)
    session.flush()
    return alert


def apply_reconciliation(*, session: Session, settings: Settings, result: Reconciliation) -> list[Alert]:
    """Write `result` in `session` (the caller commits); returns the alerts opened and resolved."""
    now, changed = result.now, []
    rows = {a.id: a for a in session.exec(select(Alert).where(col(Alert.state).in_(UNRESOLVED)))}
    for seen in result.seen:
        alert = rows[seen.alert_id]
        alert.last_value, alert.last_seen_at, alert.misses = seen.condition.value, now, 0
        alert.message = seen.condition.message[:1024]
        session.add(alert)
    for miss in result.misses:
        rows[miss.alert_id].misses = miss.misses
        session.add(rows[miss.alert_id])
    events: list[tuple[str, Alert]] = []
    for alert_id in result.resolves:
        alert = rows[alert_id]
        alert.state, alert.resolved_at, alert.open_key = AlertState.RESOLVED.value, now, None
        session.add(alert)
        events.append(("alert.resolved", alert))
    for condition in result.opens:
        events.append(("alert.opened", _open(session, condition, now)))
    session.flush()
    for event, alert in events:
        _enqueue(session, settings, event, alert, now)
        figures = {"value": alert.last_value, "threshold": alert.threshold}
        _audit(session, ACTOR, event, alert, **figures)  # last: it holds the chain's head until commit
        changed.append(alert)
    return changed


def evaluate_alerts(
    *,
    engine: Engine,
    settings: Settings,
    now: datetime,
    rules: Sequence[Rule] | None = None,
    sources: Iterable[Source] = SOURCES,
) -> Reconciliation:
    """One evaluation: observe, evaluate, reconcile with the unresolved alerts, apply and commit."""
    with Session(engine, expire_on_commit=False) as session:
        observations = [o for source in sources for o in source(session, now, settings)]
        judged = configured_rules(settings) if rules is None else rules
        conditions = evaluate(judged, observations, load_overrides(session))
        unresolved = session.exec(select(Alert).where(col(Alert.state).in_(UNRESOLVED)))
        open_alerts = [
            OpenAlert(a.id, a.open_key or alert_key(a.rule, a.cohort, a.model_name), a.misses)
            for a in unresolved
            if a.id is not None
        ]
        result = reconcile(open_alerts, conditions, now, resolve_after=settings.alert_resolve_after)
        changed = apply_reconciliation(session=session, settings=settings, result=result)
        session.commit()
    for alert in changed:
        log.warning("alert %s id=%s: %s", alert.state, alert.id, alert.message)
    return result


def ack_alert(
    *, session: Session, settings: Settings, alert_id: int, actor: str, note: str | None, now: datetime
) -> Alert:
    """Acknowledge an unresolved alert (it stays open until its condition goes); audited, webhooks told.

    `NotFoundError` for an unknown id, `ConflictError` for a resolved or already acknowledged alert.
    """
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise NotFoundError(f"alert {alert_id} does not exist")
    if alert.state == AlertState.RESOLVED.value:
        raise ConflictError(f"alert {alert_id} is resolved already: there is nothing to acknowledge")
    if alert.state == AlertState.ACKED.value:
        raise ConflictError(f"alert {alert_id} was acknowledged by {alert.acked_by} already")
    alert.state, alert.acked_at, alert.acked_by, alert.ack_note = AlertState.ACKED.value, now, actor, note
    session.add(alert)
    session.flush()
    _enqueue(session, settings, "alert.acked", alert, now)
    _audit(session, actor, "alert.acked", alert, note=note)
    session.commit()
    return alert


def list_alerts(
    *,
    session: Session,
    state: str = "all",
    rule: str | None = None,
    model: str | None = None,
    limit: int = 100,
) -> list[AlertPublic]:
    """Alerts, newest first: of one state (`unresolved`: open or acked; `all`), rule and model."""
    if state not in STATE_FILTERS:
        raise InvalidInputError(f"state must be one of {', '.join(STATE_FILTERS)}, got {state!r}", field="state")
    statement = select(Alert)
    if state == "unresolved":
        statement = statement.where(col(Alert.state).in_(UNRESOLVED))
    elif state != "all":
        statement = statement.where(Alert.state == state)
    if rule is not None:
        statement = statement.where(Alert.rule == rule)
    if model is not None:
        statement = statement.where(Alert.model_name == model)
    rows = session.exec(statement.order_by(col(Alert.id).desc()).limit(limit))
    return [AlertPublic.model_validate(row, from_attributes=True) for row in rows]


def get_alert(*, session: Session, alert_id: int) -> AlertDetailPublic:
    """One alert with its webhook deliveries (URLs without credentials); `NotFoundError` if unknown."""
    alert = session.get(Alert, alert_id)
    if alert is None:
        raise NotFoundError(f"alert {alert_id} does not exist")
    rows = session.exec(select(AlertDelivery).where(AlertDelivery.alert_id == alert_id).order_by(col(AlertDelivery.id)))
    deliveries = [
        AlertDeliveryPublic.model_validate(row, from_attributes=True).model_copy(update={"url": redact_url(row.url)})
        for row in rows
    ]
    detail = AlertDetailPublic.model_validate(alert, from_attributes=True)
    return detail.model_copy(update={"deliveries": deliveries})


def pending_deliveries(*, session: Session) -> int:
    """Webhook deliveries still waiting for an attempt."""
    return len(list(session.exec(select(AlertDelivery.id).where(AlertDelivery.state == DeliveryState.PENDING.value))))


# -- rule overrides ----------------------------------------------------------------------------------


def load_overrides(session: Session) -> list[RuleOverride]:
    """Every operator override of a rule, as `evaluate` takes them."""
    rows = session.exec(select(AlertRuleOverride).order_by(col(AlertRuleOverride.id)))
    return [
        RuleOverride(
            rule=r.rule, model=r.model_name, enabled=r.enabled, threshold=(r.thresholds or {}).get("threshold")
        )
        for r in rows
    ]


def _rule(settings: Settings, name: str) -> Rule:
    rules = {r.name: r for r in configured_rules(settings)}
    if name not in rules:
        raise NotFoundError(f"alert rule {name!r} does not exist; the rules are {', '.join(sorted(rules))}")
    return rules[name]


def _override_row(session: Session, rule: str, model: str) -> AlertRuleOverride | None:
    statement = select(AlertRuleOverride).where(AlertRuleOverride.rule == rule, AlertRuleOverride.model_name == model)
    return session.exec(statement).first()


def effective_rules(*, session: Session, settings: Settings) -> list[dict[str, object]]:
    """Each rule as evaluated: its settings, then fleet-wide (`enabled`, `threshold`, and where each comes from),
    then one entry per model with an override of it (its effective values and their sources)."""
    overrides = load_overrides(session)
    rows = {(r.rule, r.model_name): r for r in session.exec(select(AlertRuleOverride))}
    out: list[dict[str, object]] = []
    for rule in configured_rules(settings):
        fleet = effective_rule(rule, None, overrides)
        models = []
        for model in sorted({o.model for o in overrides if o.rule == rule.name and o.model != ANY_MODEL}):
            mine = effective_rule(rule, model, overrides)
            row = rows[(rule.name, model)]
            models.append({
                "model": model, "enabled": mine.enabled, "enabled_from": mine.enabled_from,
                "threshold": mine.rule.threshold, "threshold_from": mine.threshold_from,
                "updated_by": row.updated_by, "updated_at": row.updated_at,
            })  # fmt: skip
        out.append({
            **rule.model_dump(), "threshold": fleet.rule.threshold, "settings_threshold": rule.threshold,
            "enabled": fleet.enabled, "enabled_from": fleet.enabled_from, "threshold_from": fleet.threshold_from,
            "models": models,
        })  # fmt: skip
    return out


def set_rule_override(
    *,
    session: Session,
    settings: Settings,
    rule: str,
    model: str | None,
    actor: str,
    enabled: bool | None = None,
    threshold: float | None = None,
) -> AlertRuleOverride:
    """Switch `rule` off or on and/or set its threshold for `model` (None: fleet-wide); what is not given stays as the
    override had it. Audited (`alert.rule_set`). `NotFoundError` for an unknown rule, `InvalidInputError` for a
    threshold out of the rule's range, nothing to change, or a per-model change of a rule not judged per model."""
    target = _rule(settings, rule)
    if enabled is None and threshold is None:
        raise InvalidInputError("give a threshold, or switch the rule off or on", field="threshold")
    if model is not None and not target.per_model:
        raise InvalidInputError(
            f"{rule} is not judged per model (its alerts name no model): change it fleet-wide, without a model",
            field="model",
        )
    if threshold is not None and (problem := threshold_problem(target, threshold)) is not None:
        raise InvalidInputError(problem, field="threshold")
    key = model or ANY_MODEL
    row = _override_row(session, rule, key) or AlertRuleOverride(model_name=key, rule=rule, updated_by=actor)
    before = {"enabled": row.enabled, "threshold": (row.thresholds or {}).get("threshold")}
    if enabled is not None:
        row.enabled = enabled
    if threshold is not None:
        row.thresholds = {**(row.thresholds or {}), "threshold": threshold}
    row.updated_by, row.updated_at = actor, utcnow()
    session.add(row)
    after = {"enabled": row.enabled, "threshold": row.thresholds.get("threshold")}
    audit.record(
        session=session, actor=actor, action="alert.rule_set", subject=f"alert_rule:{rule}:{key}",
        details={"rule": rule, "model": key, "before": before, "after": after},
    )  # fmt: skip
    session.commit()
    session.refresh(row)
    return row


def reset_rule_override(*, session: Session, settings: Settings, rule: str, model: str | None, actor: str) -> None:
    """Remove the override of `rule` for `model` (None: the fleet-wide one): the level below applies again. Audited
    (`alert.rule_reset`); `NotFoundError` for an unknown rule or when there is no such override."""
    _rule(settings, rule)
    key = model or ANY_MODEL
    row = _override_row(session, rule, key)
    if row is None:
        where = "fleet-wide" if key == ANY_MODEL else f"for model {key}"
        raise NotFoundError(f"alert rule {rule} has no override {where}: nothing to reset")
    before = {"enabled": row.enabled, "threshold": (row.thresholds or {}).get("threshold")}
    session.delete(row)
    audit.record(
        session=session, actor=actor, action="alert.rule_reset", subject=f"alert_rule:{rule}:{key}",
        details={"rule": rule, "model": key, "before": before},
    )  # fmt: skip
    session.commit()
