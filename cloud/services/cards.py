"""Model cards: a versioned schema, the canonical digest that goes into signed target metadata, and the rules for
changing a card.

A card says what a version is for (intended use, training-data provenance, metrics, limitations, owner) and
carries its risk class, which decides how the version is signed: `low` by the coordinator's online key, `high`
only once enough approvers have signed (`cloud.services.approvals`). The card of a high-risk version is part of
what the approvers signed, so it is frozen from the moment it awaits approval; a low-risk version's card may
change, which sends the version back to `unsigned` for the signer to sign it again.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StringConstraints,
    ValidationError,
    field_validator,
    model_validator,
)
from sqlalchemy.exc import IntegrityError
from sqlmodel import Session, select

from cloud import audit
from cloud.errors import ConflictError, InvalidInputError, NotFoundError
from cloud.models import ModelCard, ModelVersion, as_utc
from cloud.services.registry import get_model_version
from protocol.messages import utcnow

__all__ = [
    "CARD_SCHEMA_VERSION",
    "FROZEN_CARD",
    "ModelCardPublic",
    "ModelCardV1",
    "canonical_json",
    "card_digest",
    "card_public",
    "find_card",
    "get_card",
    "parse_card",
    "require_card",
    "set_card",
]

CARD_SCHEMA_VERSION = 1
RiskClass = Literal["low", "high"]
FROZEN_CARD = "the card of a high-risk version is part of what approvers signed; push a new version"
# Signing states in which a high-risk version's card is frozen (approvers sign, or have signed, over its digest).
_FROZEN_STATES = frozenset({"awaiting_approval", "signed"})

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=10_000)]
MetricName = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=128)]
# Strict numbers (`true` or "0.9" are not metrics; 1 is stored as 1.0, so the digest does not depend on how a
# figure was typed). NaN and Infinity have no JSON form, so no canonical digest either.
Metric = Annotated[StrictFloat, Field(allow_inf_nan=False)]


class ModelCardV1(BaseModel):
    """Version 1 of the model card; keys it does not know are kept under `extra` (and covered by the digest)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    schema_version: Literal[1] = 1  # CARD_SCHEMA_VERSION; a later schema is a new class that accepts its number
    intended_use: Text = Field(description="What the model is for, and what it must not be used for.")
    training_data: str | dict[str, Any] = Field(
        description="Provenance of the training data: a sentence, or an object (source, version, licence, ...)."
    )
    metrics: dict[MetricName, Metric] = Field(
        default_factory=dict, description="Measured figures by name, e.g. accuracy: 0.97 (may be empty)."
    )
    limitations: Text = Field(description="Known failure modes and conditions outside which it was not tested.")
    risk_class: RiskClass = Field(description="`high` needs approvers' signatures before any device may run it.")
    owner: Text = Field(description="Who answers for the model (a person or team).")
    extra: dict[str, Any] = Field(default_factory=dict, description="Further keys, kept as given.")

    @model_validator(mode="before")
    @classmethod
    def _keep_unknown_keys(cls, data: Any) -> Any:
        """Move keys this version of the schema does not know under `extra` instead of refusing them."""
        if not isinstance(data, Mapping):
            return data
        known = set(cls.model_fields)
        unknown = {k: v for k, v in data.items() if k not in known}
        if not unknown:
            return data
        extra = data.get("extra", {})
        if not isinstance(extra, Mapping):
            return data  # let the field's own validation name `extra`
        # A key given at the top level wins over the same key under `extra` (the newer word, e.g. `--set key=...`).
        return {**{k: v for k, v in data.items() if k in known}, "extra": {**extra, **unknown}}

    @field_validator("training_data", mode="before")
    @classmethod
    def _provenance(cls, value: Any) -> Any:
        """Text or an object, and not empty (one clear message instead of one per member of the union)."""
        if isinstance(value, str):
            value = value.strip()
        if not isinstance(value, str | Mapping) or not value:
            raise ValueError("give the training data's provenance as text or a non-empty object")
        return value


class ModelCardPublic(BaseModel):
    """A version's card as the API shows it, with its digest and the version's governance state."""

    name: str
    version: str
    risk_class: str
    signing_state: str
    card: dict[str, Any]
    sha256: str = Field(description="sha256 of the card's canonical JSON (sorted keys, no whitespace, UTF-8).")
    updated_by: str
    updated_at: datetime


def canonical_json(value: Any) -> bytes:
    """`value` as canonical JSON: sorted keys, no whitespace, UTF-8 (non-ASCII kept as is), no NaN/Infinity."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


def card_digest(card: ModelCardV1 | Mapping[str, Any]) -> str:
    """sha256 (hex) of a card's canonical JSON; a mapping is digested as given (stored cards are normalised)."""
    data = card.model_dump(mode="json") if isinstance(card, ModelCardV1) else card
    return hashlib.sha256(canonical_json(data)).hexdigest()


def parse_card(card: Mapping[str, Any]) -> ModelCardV1:
    """A card validated against the schema; `InvalidInputError` names every offending field (the first as `field`)."""
    if not isinstance(card, Mapping):
        raise InvalidInputError("a model card is a JSON object", field="card")
    try:
        parsed = ModelCardV1.model_validate(dict(card))
    except ValidationError as exc:
        problems = [(_where(err["loc"]), _message(err)) for err in exc.errors()]
        detail = "; ".join(f"{where}: {message}" for where, message in problems[:8])
        raise InvalidInputError(f"invalid model card: {detail}", field=problems[0][0]) from exc
    for name in ("training_data", "extra"):  # free-form parts: NaN or Infinity there would have no digest
        try:
            canonical_json(getattr(parsed, name))
        except ValueError as exc:
            raise InvalidInputError(f"invalid model card: {name}: NaN and Infinity are not JSON", field=name) from exc
    return parsed


def _where(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(part) for part in loc) or "card"


def _message(err: Any) -> str:
    if err["type"] == "missing":
        return "required"
    return str(err["msg"]).removeprefix("Value error, ")


def find_card(*, session: Session, record: ModelVersion) -> ModelCard | None:
    """The card of a version, or None."""
    return session.exec(select(ModelCard).where(ModelCard.model_version_id == record.id)).first()


def get_card(*, session: Session, name: str, version: str) -> tuple[ModelVersion, ModelCard]:
    """A version and its card; `NotFoundError` for an unknown version or one without a card."""
    record = get_model_version(session=session, name=name, version=version)
    card = find_card(session=session, record=record)
    if card is None:
        ref = f"{name}:{version}"
        raise NotFoundError(f"{ref} has no model card; add one with `edgefleet models card {ref} --file card.json`")
    return record, card


def set_card(*, session: Session, name: str, version: str, card: Mapping[str, Any], actor: str) -> ModelCard:
    """Validate and store the card of `name:version`, and take the version's risk class from it.

    Without `risk_class` the card keeps the version's current one. A high-risk version awaiting approval or
    signed keeps its card (`ConflictError`: approvers signed over its digest); storing the same card again is
    a no-op. Any other change sends the version back to `unsigned`, so the governance signer signs it anew.
    """
    record = _lock_version(session, name, version)
    parsed = parse_card({"risk_class": record.risk_class, **card})
    digest = card_digest(parsed)
    stored = find_card(session=session, record=record)
    if stored is not None and stored.sha256 == digest and record.risk_class == parsed.risk_class:
        session.commit()  # nothing changes; ends the transaction and its row lock
        return stored
    if record.risk_class == "high" and record.signing_state in _FROZEN_STATES:
        session.rollback()
        raise ConflictError(f"{name}:{version}: {FROZEN_CARD}")
    if record.risk_class == "low" and parsed.risk_class == "high" and record.signing_state == "signed":
        session.rollback()
        raise ConflictError(
            f"{name}:{version} is signed as low risk and devices may install it as such; "
            "push a new version with --risk high (and its card)"
        )
    assert record.id is not None
    if stored is None:
        stored = ModelCard(model_version_id=record.id, card={}, sha256=digest)
    stored.card = parsed.model_dump(mode="json")
    stored.sha256 = digest
    stored.updated_by = actor
    stored.updated_at = utcnow()
    record.risk_class = parsed.risk_class
    record.signing_state = "unsigned"  # what was signed (if anything) no longer describes this version
    session.add(stored)
    session.add(record)
    details = {"sha256": digest, "risk_class": parsed.risk_class}
    audit.record(session=session, actor=actor, action="card.updated", subject=f"{name}:{version}", details=details)
    try:
        session.commit()
    except IntegrityError as exc:  # a concurrent first card for the same version won the race
        session.rollback()
        raise ConflictError(f"the card of {name}:{version} was changed concurrently; try again") from exc
    session.refresh(stored)
    return stored


def _lock_version(session: Session, name: str, version: str) -> ModelVersion:
    """The version, locked until commit where the database can (PostgreSQL), so that a card change and an
    approval cannot interleave; `NotFoundError` names what is missing."""
    get_model_version(session=session, name=name, version=version)
    statement = (
        select(ModelVersion)
        .where(ModelVersion.name == name, ModelVersion.version == version)
        .with_for_update()
        .execution_options(populate_existing=True)  # the locked row as it is now, not as an earlier read saw it
    )
    return session.exec(statement).one()


def require_card(*, session: Session, record: ModelVersion) -> ModelCard | None:
    """The card a signature of `record` must cover (None for a low-risk version without one).

    A high-risk version cannot be signed without a card: `InvalidInputError` says how to add one.
    """
    card = find_card(session=session, record=record)
    if card is None and record.risk_class == "high":
        ref = f"{record.name}:{record.version}"
        raise InvalidInputError(
            f"{ref} is high risk and has no model card, so it cannot be signed; add one with "
            f"`edgefleet models card {ref} --file card.json`",
            field="card",
        )
    return card


def card_public(record: ModelVersion, card: ModelCard) -> ModelCardPublic:
    """The API shape of a version's card."""
    updated_at = as_utc(card.updated_at)
    assert updated_at is not None
    return ModelCardPublic(
        name=record.name,
        version=record.version,
        risk_class=record.risk_class,
        signing_state=record.signing_state,
        card=card.card,
        sha256=card.sha256,
        updated_by=card.updated_by,
        updated_at=updated_at,
    )
