"""The running coordinator: what the routes, the bridge and the rollout runner share at run time.

`create_app(settings)` builds one and keeps it on `app.state.coordinator`; route handlers get it through
`cloud.api.deps.CoordinatorDep`.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from sqlalchemy.engine import Engine

from cloud.artifacts import ArtifactStore
from cloud.bridge import MqttBridge
from cloud.broker import EmbeddedBroker
from cloud.rollouts.runner import RolloutRunner
from cloud.settings import Settings
from cloud.telemetry.counters import IngestCounters
from protocol.messages import DesiredState

__all__ = ["Coordinator"]

log = logging.getLogger(__name__)


@dataclass
class Coordinator:
    """What the routes need at run time; lives on `app.state.coordinator`."""

    settings: Settings
    engine: Engine
    store: ArtifactStore
    counters: IngestCounters = field(default_factory=IngestCounters)
    admin_token: str = ""
    admin_token_created: bool = False
    mqtt_url: str | None = None
    broker: EmbeddedBroker | None = None
    bridge: MqttBridge | None = None
    rollouts: RolloutRunner | None = None

    @property
    def public_url(self) -> str:
        """The URL devices fetch artifacts from."""
        return self.settings.resolved_public_url()

    def publish_desired(self, state: DesiredState) -> None:
        """Hand a desired state to the bridge (dropped with a warning when MQTT is disabled)."""
        if self.bridge is None:
            log.warning("no MQTT bridge; desired state for %s not published", state.device_id)
            return
        self.bridge.publish_desired(state)
