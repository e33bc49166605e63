"""Decommissioning a device: revoked for good, out of the fleet, its history kept.

`decommission_device` revokes the device exactly as `revoke_device` does (every certificate on the CRL, its
desired state forgotten), then marks it `decommissioned`: deployments, rollouts and the fleet summary leave it
out, and deployment targets it will never finish are marked superseded, so their deployments settle. Its
events, telemetry and deployment history stay. A new enrolment token brings the id back as a new device.
"""

from __future__ import annotations

import logging

from sqlmodel import Session, col, select

from cloud import audit
from cloud.models import DeploymentTarget, Device, DeviceEventRecord, EnrolmentState, TargetStatus
from cloud.pki import FleetPki
from cloud.services.enrolment import require_device, revoke_device
from protocol.messages import utcnow

__all__ = ["decommission_device"]

log = logging.getLogger(__name__)

_UNSETTLED = (TargetStatus.PENDING.value, TargetStatus.IN_PROGRESS.value)


def decommission_device(*, session: Session, pki: FleetPki, device_id: str, by: str) -> tuple[Device, bool]:
    """Revoke `device_id` and take it out of the fleet; `(device, changed)` (a decommissioned one stays as it is).

    `NotFoundError` if the fleet does not know the device.
    """
    device = require_device(session=session, device_id=device_id)
    if device.enrolment == EnrolmentState.DECOMMISSIONED:
        return device, False
    revoke_device(session=session, pki=pki, device_id=device_id, by=by)  # commits, and rewrites the CRL
    device = require_device(session=session, device_id=device_id)
    now = utcnow()
    device.enrolment = EnrolmentState.DECOMMISSIONED.value
    device.decommissioned_at = now
    session.add(device)
    superseded = []
    statement = select(DeploymentTarget).where(
        DeploymentTarget.device_id == device_id, col(DeploymentTarget.status).in_(_UNSETTLED)
    )
    for target in session.exec(statement):
        target.status = TargetStatus.SUPERSEDED.value
        target.error_message = "device decommissioned"
        target.updated_at = now
        session.add(target)
        superseded.append(target.deployment_id)
    session.add(DeviceEventRecord(device_id=device_id, kind="device.decommissioned", message=f"decommissioned by {by}"))
    details = {"superseded_deployments": sorted(superseded)}
    audit.record(session=session, actor=by, action="device.decommissioned", subject=device_id, details=details)
    session.commit()
    session.refresh(device)
    log.warning("device decommissioned device=%s by=%s", device_id, by)
    return device, True
