"""Which devices the coordinator knows: enrolment and the lookups every device-facing service shares."""

from __future__ import annotations

from sqlmodel import Session

from cloud.errors import NotFoundError
from cloud.models import Device

__all__ = ["enrol", "require_device"]


def enrol(*, session: Session, device_id: str) -> Device:
    """The device row, created on first contact (auto-enrolment)."""
    device = session.get(Device, device_id)
    if device is None:
        device = Device(id=device_id)
        session.add(device)
        session.flush()
    return device


def require_device(*, session: Session, device_id: str) -> Device:
    """The enrolled device `device_id`; `NotFoundError` if there is none."""
    device = session.get(Device, device_id)
    if device is None:
        raise NotFoundError(f"device {device_id!r} is not enrolled (it has not sent any message yet)")
    return device
