"""Helpers of the model-card and approval-policy tests: a card, version rows, approvers and their signatures."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.engine import Engine
from sqlmodel import Session

from cloud.db import create_db_engine, init_db
from cloud.models import ApprovalSignature, Approver, Model, ModelVersion
from cloud.services.registry import get_model_version

CARD: dict[str, Any] = {
    "intended_use": "Reading handwritten digits on paper forms; not for identity documents.",
    "training_data": {"source": "scikit-learn digits (UCI)", "images": 1797, "split": "80/20"},
    "metrics": {"accuracy": 0.97, "agreement_int8": 1},
    "limitations": "8x8 greyscale crops only; untested on other scripts.",
    "risk_class": "low",
    "owner": "vision-team",
}
INPUTS = json.dumps([{"name": "input", "datatype": "FP32", "shape": [-1, 64]}])


@contextmanager
def migrated_engine(database_url: str) -> Iterator[Engine]:
    """An engine on a database migrated to head (the schema of cloud/migrations, as a coordinator runs it)."""
    engine = create_db_engine(database_url)
    init_db(engine)
    try:
        yield engine
    finally:
        engine.dispose()


def add_version(engine: Engine, name: str, version: str, *, risk: str = "low", state: str = "unsigned") -> None:
    """A registered version (no artifact bytes: cards and the policy only read the row)."""
    with Session(engine) as session:
        model = Model(name=name)
        session.add(model)
        session.flush()
        assert model.id is not None
        session.add(
            ModelVersion(
                model_id=model.id,
                name=name,
                version=version,
                sha256="ab" * 32,
                size=1,
                format="onnx",
                risk_class=risk,
                signing_state=state,
            )
        )
        session.commit()


def version_row(engine: Engine, name: str, version: str) -> ModelVersion:
    """The version as stored now."""
    with Session(engine) as session:
        return get_model_version(session=session, name=name, version=version)


def set_state(engine: Engine, name: str, version: str, state: str) -> None:
    """Set a version's signing state (what the governance signer does)."""
    with Session(engine) as session:
        record = get_model_version(session=session, name=name, version=version)
        record.signing_state = state
        session.add(record)
        session.commit()


def add_approvers(engine: Engine, *names: str, revoked: tuple[str, ...] = ()) -> None:
    """Approvers with made-up key ids (`key-<name>`); those in `revoked` are revoked."""
    with Session(engine) as session:
        for name in names:
            session.add(
                Approver(
                    name=name,
                    keyid=f"key-{name}",
                    public_key={"keytype": "ed25519", "scheme": "ed25519", "keyval": {"public": name}},
                    added_by="admin",
                    revoked_at=datetime(2026, 1, 1, tzinfo=UTC) if name in revoked else None,
                )
            )
        session.commit()


def sign(engine: Engine, role: str, approver: str, *, version: int = 1) -> None:
    """A signature of `approver`'s key over `version` of `role`'s metadata (a fake: the policy reads rows only)."""
    with Session(engine) as session:
        session.add(
            ApprovalSignature(
                role=role, version=version, keyid=f"key-{approver}", signature="00" * 64, approver=approver
            )
        )
        session.commit()
