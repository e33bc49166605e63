"""The running coordinator: what the routes, the bridge and the rollout runner share at run time.

`create_app(settings)` builds one and keeps it on `app.state.coordinator`; route handlers get it through
`cloud.api.deps.CoordinatorDep`.
"""

from __future__ import annotations

import logging
import os
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy.engine import Engine
from sqlmodel import Session

from cloud.artifacts import ArtifactStore
from cloud.audit import HEAD_FILE, AuditCheckpointer, load_audit_key
from cloud.bridge import MqttBridge
from cloud.broker import EmbeddedBroker
from cloud.broker_rights import replica_identity
from cloud.federation.flower import FlowerControl
from cloud.federation.runner import FederatedRunner
from cloud.federation.superlink import Federation
from cloud.governance.maintainer import GovernanceMaintainer
from cloud.governance.service import Governance
from cloud.leases import Leases
from cloud.models import ModelVersion
from cloud.pki import FleetPki, private_write
from cloud.rollouts.runner import RolloutRunner
from cloud.services.approvals import ensure_deployable
from cloud.services.registry import ArtifactLinks, get_model_version
from cloud.settings import Settings
from cloud.telemetry.counters import IngestCounters
from cloud.telemetry.processes import IngestProcesses
from cloud.variant_policy import Variant
from protocol.messages import DesiredState
from protocol.mqtt import strip_mqtt_credentials

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
    ingest: IngestProcesses | None = None  # with Settings.ingest_processes > 1: the extra ingest processes
    rollouts: RolloutRunner | None = None
    pki: FleetPki | None = None
    artifact_secret: bytes = b""
    audit: AuditCheckpointer | None = None
    federation: Federation | None = None  # with Settings.federated: the SuperLink, node registration
    flower: FlowerControl | None = None  # the `flwr` control of that SuperLink (None: federated learning off)
    federated_runs: FederatedRunner | None = None  # steps federated runs (started when `flower` is set)
    leases: Leases | None = None  # with Settings.replicated: who of the replicas steps what (`cloud.leases`)

    @property
    def public_url(self) -> str:
        """The URL devices fetch artifacts from."""
        return self.settings.resolved_public_url()

    governance: Governance | None = None
    maintainer: GovernanceMaintainer | None = None

    @property
    def links(self) -> ArtifactLinks:
        """Per-device artifact download URLs (with their download tokens) and the director's signature."""
        instruct = None
        if self.governance is not None:
            governance = self.governance

            def instruct(device_id: str, generation: int, record: ModelVersion, variant: Variant) -> str:
                return governance.instruction(
                    device_id=device_id, generation=generation, record=record, variant=variant
                )

        return ArtifactLinks(self.public_url, self.artifact_secret, instruct)

    @property
    def device_mqtt_url(self) -> str | None:
        """The broker URL devices are told at enrolment (never with credentials)."""
        url = self.settings.device_mqtt_url or self.mqtt_url
        return strip_mqtt_credentials(url) if url else None

    def fleet_pki(self) -> FleetPki:
        """The fleet CA (created on first use)."""
        if self.pki is None:
            self.pki = FleetPki(self.settings.resolved_pki_dir, broker_hostnames=self.settings.broker_hostnames)
            self.pki.ensure()
        return self.pki

    def bridge_certificate(self) -> tuple[Path, Path]:
        """`(certificate, key)` the bridge presents to the broker: a replica's own (`FleetPki.replica_files`: its CN
        is its client id on Mosquitto), else the coordinator's."""
        settings = self.settings
        if not settings.replicated:
            return self.fleet_pki().coordinator_files()
        identity = replica_identity(settings.replica)
        if "replica" not in settings.model_fields_set:
            log.warning(
                "replica name %s is the default (<hostname>-<pid>, new at every start): a broker with per-client "
                "rights gives its certificate cn=%s none unless its ACL lists it; start each replica with a stable "
                "--replica NAME and list them (edgefleet broker mosquitto-config --replica NAME)",
                settings.replica,
                identity,
            )
        else:
            log.info("replica broker identity cn=%s (the broker's ACL must list it)", identity)
        return self.fleet_pki().replica_files(settings.replica)

    def audit_checkpointer(self) -> AuditCheckpointer:
        """The audit log's signer: its key in the PKI directory (made on first use), its head file in data_dir."""
        if self.audit is None:
            key = load_audit_key(self.settings.resolved_pki_dir)
            self.audit = AuditCheckpointer(
                engine=self.engine, key=key, head_file=self.settings.data_dir / HEAD_FILE, leases=self.leases
            )
        return self.audit

    def approval_threshold(self, session: Session) -> int:
        """The approvals a high-risk version needs: the root policy's threshold (what devices enforce), else,
        before root metadata exists, the `approval_threshold` setting."""
        governance = self.governance
        if governance is not None and governance.repository.initialized:
            return governance.repository.policy(session).approval_threshold
        return self.settings.approval_threshold

    def ensure_deployable(self, session: Session, name: str, version: str) -> None:
        """`ConflictError` (409) unless `name:version` is signed (and, high risk, approved by enough approvers)."""
        record = get_model_version(session=session, name=name, version=version)
        ensure_deployable(session=session, record=record, threshold=self.approval_threshold(session))

    def after_revocation(self, device_id: str) -> None:
        """Make a revocation bite at once: the broker's CRL copy and reload, the device's retained state cleared."""
        settings = self.settings
        if settings.broker_crl_file is not None:
            private_write(settings.broker_crl_file, self.fleet_pki().crl_path.read_bytes())
            os.chmod(settings.broker_crl_file, 0o644)
        if settings.broker_reload_command:
            _run_reload(settings.broker_reload_command)
        if self.bridge is not None:
            self.bridge.clear_retained(device_id)
        if self.federation is not None:
            self.federation.nudge()  # its SuperNode is unregistered (kicked) now rather than at the next tick

    def publish_desired(self, state: DesiredState) -> None:
        """Hand a desired state to the bridge (dropped with a warning when MQTT is disabled)."""
        if self.bridge is None:
            log.warning("no MQTT bridge; desired state for %s not published", state.device_id)
            return
        self.bridge.publish_desired(state)


def _run_reload(command: str) -> None:
    """Run the operator's broker reload command; a failure is logged (the CRL is written either way)."""
    try:
        done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=30, check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.error("broker reload command failed: %s", exc)
        return
    if done.returncode != 0:
        log.error("broker reload command exited %d: %s", done.returncode, (done.stderr or done.stdout).strip()[:500])
    else:
        log.info("broker reloaded after a revocation")
