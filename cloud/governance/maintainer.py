"""Keeps signed metadata fresh while the coordinator runs: repository roles and director instructions.

TUF metadata expires on purpose (a frozen or replayed repository is detected by its expiry), so the online roles
are re-signed before half their lifetime has passed (`ImageRepository.refresh`), and the director instructions of
devices that have not converged yet are re-signed and published again (`Governance.renew_instructions`).
"""

from __future__ import annotations

import logging
from typing import Protocol

from cloud.governance.service import Governance
from cloud.leases import Leases
from cloud.periodic import Periodic
from protocol.messages import DesiredState

__all__ = ["GovernanceMaintainer"]

log = logging.getLogger(__name__)


class DesiredPublisher(Protocol):
    def publish_desired(self, state: DesiredState) -> None: ...


class GovernanceMaintainer:
    """Runs `tick()` every `tick_s` seconds in a thread (and once at start)."""

    def __init__(
        self, governance: Governance, publisher: DesiredPublisher, tick_s: float, leases: Leases | None = None
    ) -> None:
        """`leases`: replicas of one coordinator re-sign in the replica holding the job's lease, one at a time."""
        self._governance = governance
        self._publisher = publisher
        self._periodic = Periodic("governance-maintainer", self.tick, tick_s, at_start=True, lease=leases)

    def tick(self) -> list[str]:
        """Re-sign what is due and publish renewed instructions; what was re-signed (roles, then device ids)."""
        roles = self._governance.repository.refresh()
        if roles:
            log.info("repository metadata re-signed: %s", ", ".join(roles))
        states = self._governance.renew_instructions()
        for state in states:
            self._publisher.publish_desired(state)
        return roles + [s.device_id for s in states]

    def start(self) -> None:
        """Start the background thread (no-op when already running)."""
        self._periodic.start()

    def stop(self) -> None:
        """Stop the thread."""
        self._periodic.stop()
