"""The alert runner: one thread evaluates the rules every `alert_tick_s`, another delivers webhooks when due.

The two are apart so that a slow or unreachable receiver never delays an evaluation: evaluations only write
delivery rows, and the delivery thread (every `alert_delivery_poll_s`, and at once at start, so what a previous
run left pending goes out) sends what is due. Both survive failures (`cloud.periodic.Periodic`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from datetime import datetime

from sqlalchemy.engine import Engine

from cloud.alerts.rules import Reconciliation
from cloud.alerts.service import evaluate_alerts
from cloud.alerts.sources import SOURCES, Source
from cloud.alerts.webhooks import DeliveryCounters, deliver_due, redact_url
from cloud.leases import Leases
from cloud.periodic import Periodic
from cloud.settings import Settings
from protocol.messages import utcnow

__all__ = ["AlertRunner"]

log = logging.getLogger(__name__)


class AlertRunner:
    """Evaluates alert rules and delivers their webhooks in background threads, or when called."""

    def __init__(
        self,
        *,
        engine: Engine,
        settings: Settings,
        sources: Sequence[Source] = tuple(SOURCES),
        clock: Callable[[], datetime] = utcnow,
        leases: Leases | None = None,
    ) -> None:
        """`leases`: replicas of one coordinator evaluate and deliver in the replica holding each job's lease."""
        self._engine = engine
        self._settings = settings
        self._sources = sources
        self._clock = clock
        self.counters = DeliveryCounters()
        self._evaluator = Periodic("edgefleet-alerts", self.evaluate, settings.alert_tick_s or 1.0, lease=leases)
        self._deliverer = Periodic(
            "edgefleet-alert-webhooks", self.deliver, settings.alert_delivery_poll_s, at_start=True, lease=leases
        )

    def start(self) -> None:
        """Start evaluating (unless `alert_tick_s` is 0) and delivering (when webhooks are configured)."""
        settings = self._settings
        if settings.alert_tick_s > 0:
            self._evaluator.start()
        if settings.alert_webhook_urls:
            if not settings.alert_webhook_secret:
                log.warning("alert webhooks are signed with an empty secret: set EDGEFLEET_ALERT_WEBHOOK_SECRET")
            shown = ", ".join(redact_url(u) for u in settings.alert_webhook_urls)
            log.info("alert webhooks urls=%s", shown)
            self._deliverer.start()

    def stop(self) -> None:
        """Stop both threads after their current step."""
        self._evaluator.stop()
        self._deliverer.stop()

    def evaluate(self, now: datetime | None = None) -> Reconciliation:
        """One evaluation of every rule at `now` (default: the clock)."""
        return evaluate_alerts(
            engine=self._engine, settings=self._settings, now=now or self._clock(), sources=self._sources
        )

    def deliver(self, now: datetime | None = None) -> int:
        """Attempt the deliveries due at `now` (default: the clock); how many were attempted."""
        return deliver_due(
            engine=self._engine, settings=self._settings, now=now or self._clock(), counters=self.counters
        )
