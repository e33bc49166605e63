"""Alerts (docs/alerts.md): rules on fleet telemetry, devices and rollouts; one alert per condition and cohort until
it resolves; every alert audited and delivered to signed webhooks with retries.

`rules` decides (pure: `evaluate`, `reconcile`), `sources` reads the observations, `service` stores alerts and
acknowledgements, `webhooks` signs and delivers, `runner` runs both in threads.
"""

from cloud.alerts.rules import Aggregate, Condition, Observation, Rule, evaluate, reconcile
from cloud.alerts.runner import AlertRunner
from cloud.alerts.service import ack_alert, configured_rules, evaluate_alerts, get_alert, list_alerts
from cloud.alerts.sources import SOURCES, Source
from cloud.alerts.webhooks import sign

__all__ = [
    "SOURCES",
    "Aggregate",
    "AlertRunner",
    "Condition",
    "Observation",
    "Rule",
    "Source",
    "ack_alert",
    "configured_rules",
    "evaluate",
    "evaluate_alerts",
    "get_alert",
    "list_alerts",
    "reconcile",
    "sign",
]
