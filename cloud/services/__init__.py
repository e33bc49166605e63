"""The coordinator's logic, called by the API and the MQTT bridge; keyword-only functions, domain errors.

One module per concern: `registry` (models, versions, artifacts), `variants` (a version's further artifacts),
`deployments` (desired states), `devices` (reported state and events), `enrolment` (which devices exist).
Rollouts live in `cloud.rollouts`, telemetry in `cloud.telemetry`.
"""

from cloud.services.deployments import DesiredStatePublisher, create_deployment, desired_states
from cloud.services.devices import ingest_event, ingest_reported
from cloud.services.registry import push_model_version

__all__ = [
    "DesiredStatePublisher",
    "create_deployment",
    "desired_states",
    "ingest_event",
    "ingest_reported",
    "push_model_version",
]
