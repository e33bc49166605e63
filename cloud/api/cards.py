"""Routes of model cards: read a version's card (any role) and set it (publisher); the card carries the risk class."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Body, Path

from cloud.api.deps import CoordinatorDep, PrincipalDep, SessionDep, requires
from cloud.auth import Role
from cloud.services import cards
from cloud.services.cards import ModelCardPublic, ModelCardV1
from protocol.messages import Name, Version

__all__ = ["router"]

router = APIRouter(tags=["governance"])

NamePath = Annotated[Name, Path(description="Model name.")]
VersionPath = Annotated[Version, Path(description="Model version.")]
CardBody = Annotated[
    dict[str, Any],
    Body(
        description="The card (schema: ModelCardV1). Without risk_class the version keeps its own; keys the schema "
        "does not know are kept under `extra`.",
        examples=[
            {
                "intended_use": "Reading handwritten digits on forms; not for identity documents.",
                "training_data": "scikit-learn digits (1,797 8x8 images, UCI), 80% split",
                "metrics": {"accuracy": 0.97},
                "limitations": "8x8 greyscale only; untested on other scripts.",
                "risk_class": "high",
                "owner": "vision-team",
            }
        ],
    ),
]


@router.put(
    "/models/{name}/versions/{version}/card",
    dependencies=[requires(Role.PUBLISHER)],
    summary="Set the model card of a version (and with it the version's risk class)",
    responses={409: {"description": "A high-risk version awaiting approval or signed: its card is frozen."}},
    openapi_extra={"x-card-schema": ModelCardV1.model_json_schema()},
)
def put_card(
    name: NamePath,
    version: VersionPath,
    card: CardBody,
    session: SessionDep,
    coordinator: CoordinatorDep,
    principal: PrincipalDep,
) -> ModelCardPublic:
    """Validate and store the card; the version goes back to unsigned and the signer signs it anew (a high-risk
    one then awaits approval)."""
    cards.set_card(session=session, name=name, version=version, card=card, actor=principal.name)
    if coordinator.governance is not None:
        coordinator.governance.sync()
    session.expire_all()  # the signer changed the version's signing state in a session of its own
    record, stored = cards.get_card(session=session, name=name, version=version)
    return cards.card_public(record, stored)


@router.get("/models/{name}/versions/{version}/card", summary="The model card of a version, with its digest")
def get_card(name: NamePath, version: VersionPath, session: SessionDep) -> ModelCardPublic:
    """The card, its sha256 (canonical JSON) and the version's risk class and signing state."""
    record, stored = cards.get_card(session=session, name=name, version=version)
    return cards.card_public(record, stored)
