"""What the coordinator knows of each device's chain of telemetry windows: where it is settled, what is missing.

`TelemetryChain` holds, per device, the seq up to which its chain is settled (`TelemetryAck.stored_seq`) and
the windows the device says it dropped; `TelemetryGap` a hole in the chain: pending while its grace period
runs (`reported_at` null, at most one per device), reported once it is over, shrunk when late windows fill it.
"""

from __future__ import annotations

from datetime import datetime

from sqlalchemy import BigInteger
from sqlmodel import Field, SQLModel

from cloud.models._common import when

__all__ = ["TelemetryChain", "TelemetryGap", "TelemetryGapsPublic"]


class TelemetryChain(SQLModel, table=True):
    """One device's settled telemetry chain and the windows it dropped."""

    __tablename__ = "telemetry_chain"

    device_id: str = Field(primary_key=True, foreign_key="device.id", max_length=128)
    # Every window of the device up to this seq is stored, in a reported gap, or skipped by a declared jump.
    settled_seq: int | None = Field(default=None, sa_type=BigInteger)
    # The highest `TelemetryWindow.dropped_windows` the device sent: windows it dropped for good.
    dropped_windows: int = Field(default=0, sa_type=BigInteger)


class TelemetryGap(SQLModel, table=True):
    """Seqs `first_seq..last_seq` of a device that never arrived: pending, then reported."""

    __tablename__ = "telemetry_gap"

    id: int | None = Field(default=None, primary_key=True)
    device_id: str = Field(foreign_key="device.id", index=True, max_length=128)
    first_seq: int = Field(sa_type=BigInteger)
    last_seq: int = Field(sa_type=BigInteger)
    detected_at: datetime = when()
    reported_at: datetime | None = when(nullable=True)


class TelemetryGapsPublic(SQLModel):
    """A device's reported telemetry gaps: how many, how many windows in all, and the newest ranges."""

    count: int = 0
    windows: int = 0
    ranges: list[tuple[int, int]] = Field(default_factory=list)
