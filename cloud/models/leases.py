"""Leases: which coordinator replica does a piece of work (steps a rollout, runs a periodic job) until when."""

from __future__ import annotations

from datetime import datetime

from sqlmodel import Field, SQLModel

from cloud.models._common import when

__all__ = ["Lease"]


class Lease(SQLModel, table=True):
    """One named piece of work and the replica holding it; free for another replica once `expires_at` passed."""

    name: str = Field(primary_key=True, max_length=160)
    holder: str = Field(max_length=160)
    acquired_at: datetime = when()  # when `holder` took it (unchanged by renewals): a change means a takeover
    renewed_at: datetime = when()
    expires_at: datetime = when()
