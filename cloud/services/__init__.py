"""The coordinator's logic, called by the API and the MQTT bridge; keyword-only functions, domain errors."""

from cloud.services.deployments import DesiredStatePublisher, create_deployment, desired_states
from cloud.services.devices import ingest_event, ingest_reported, ingest_telemetry
from cloud.services.fleet import fleet_summary
from cloud.services.registry import push_model_version

__all__ = [
    "DesiredStatePublisher",
    "create_deployment",
    "desired_states",
    "fleet_summary",
    "ingest_event",
    "ingest_reported",
    "ingest_telemetry",
    "push_model_version",
]
