"""What comes out of `step` for the IO layer to do: publish a desired state, or call `step` again later."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import Field

from cloud.rollouts._base import Record

__all__ = ["Action", "Dispatch", "Rollback", "Wait"]


class Dispatch(Record):
    """Set the device's desired model to `model:version` (attempt `attempt`; republishing is harmless)."""

    kind: Literal["dispatch"] = "dispatch"
    device_id: str
    model: str
    version: str
    attempt: int


class Rollback(Record):
    """Set the device's desired model back to `model:to_version`."""

    kind: Literal["rollback"] = "rollback"
    device_id: str
    model: str
    to_version: str
    attempt: int


class Wait(Record):
    """Call `step` again at `until` at the latest (a bake ends, a retry is due or a device times out)."""

    kind: Literal["wait"] = "wait"
    until: datetime


Action = Annotated[Dispatch | Rollback | Wait, Field(discriminator="kind")]
