"""Model cards: the schema and its canonical digest, the rules for changing a card, the API and the CLI."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

import cloud.cli as cli
from cloud.client import ApiClient
from cloud.errors import ConflictError, InvalidInputError, NotFoundError
from cloud.services.cards import (
    FROZEN_CARD,
    canonical_json,
    card_digest,
    get_card,
    parse_card,
    require_card,
    set_card,
)
from tests.cloud.cards_helpers import CARD, INPUTS, add_version, set_state, version_row
from tests.cloud.conftest import Api

# -- the schema and its digest ---------------------------------------------------------------------------


def test_same_card_in_another_key_order_has_the_same_digest() -> None:
    reordered = json.loads(json.dumps(CARD, sort_keys=True))
    reordered = dict(reversed(list(reordered.items())))
    reordered["training_data"] = dict(reversed(list(CARD["training_data"].items())))
    assert list(reordered) != list(CARD)
    assert card_digest(parse_card(reordered)) == card_digest(parse_card(CARD))
    # A figure typed as 1 or 1.0 is the same figure, and the same digest.
    as_float = {**CARD, "metrics": {"accuracy": 0.97, "agreement_int8": 1.0}}
    assert card_digest(parse_card(as_float)) == card_digest(parse_card(CARD))
    assert card_digest(parse_card({**CARD, "owner": "someone-else"})) != card_digest(parse_card(CARD))


def test_digest_is_sha256_of_sorted_compact_utf8_json() -> None:
    assert canonical_json({"b": [1, 2.5], "a": "Zürich"}) == '{"a":"Zürich","b":[1,2.5]}'.encode()
    assert card_digest({"b": 1, "a": "é"}) == hashlib.sha256('{"a":"é","b":1}'.encode()).hexdigest()
    # Pinned: the digest goes into signed target metadata, so the canonical form of a card must never drift.
    pinned = (
        '{"extra":{},"intended_use":"Reading handwritten digits on paper forms; not for identity documents.",'
        '"limitations":"8x8 greyscale crops only; untested on other scripts.","metrics":{"accuracy":0.97,'
        '"agreement_int8":1.0},"owner":"vision-team","risk_class":"low","schema_version":1,"training_data":'
        '{"images":1797,"source":"scikit-learn digits (UCI)","split":"80/20"}}'
    )
    assert canonical_json(parse_card(CARD).model_dump(mode="json")) == pinned.encode()
    assert card_digest(parse_card(CARD)) == hashlib.sha256(pinned.encode()).hexdigest()
    assert card_digest(parse_card(CARD)) == "e411eb01b20a8735a6d87d15671cc5a76d94fd6c05c932f301c39b9ab642a061"


def test_unknown_keys_are_kept_under_extra_and_covered_by_the_digest() -> None:
    card = parse_card({**CARD, "ethics_review": "2026-10-02, board B", "extra": {"ticket": "GOV-12"}})
    assert card.extra == {"ethics_review": "2026-10-02, board B", "ticket": "GOV-12"}
    assert card.schema_version == 1
    assert card_digest(card) != card_digest(parse_card(CARD))


@pytest.mark.parametrize(
    ("change", "field", "words"),
    [
        ({"intended_use": None}, "intended_use", "required"),
        ({"intended_use": "   "}, "intended_use", "at least 1 character"),
        ({"training_data": {}}, "training_data", "provenance"),
        ({"training_data": 42}, "training_data", "provenance"),
        ({"limitations": None}, "limitations", "required"),
        ({"owner": None}, "owner", "required"),
        ({"metrics": {"accuracy": "high"}}, "metrics.accuracy", "valid number"),
        ({"metrics": {"accuracy": True}}, "metrics.accuracy", "valid number"),
        ({"metrics": {"accuracy": float("nan")}}, "metrics.accuracy", "finite"),
        ({"metrics": [0.9]}, "metrics", "dictionary"),
        ({"risk_class": "medium"}, "risk_class", "'low' or 'high'"),
        ({"schema_version": 2}, "schema_version", "1"),
        ({"training_data": {"rows": float("inf")}}, "training_data", "NaN and Infinity"),
        ({"notes": {"score": float("nan")}}, "extra", "NaN and Infinity"),
    ],
)
def test_invalid_card_is_refused_naming_the_field(change: dict[str, Any], field: str, words: str) -> None:
    card = {k: v for k, v in {**CARD, **change}.items() if v is not None}
    with pytest.raises(InvalidInputError) as refused:
        parse_card(card)
    assert refused.value.field == field
    assert f"{field}: " in str(refused.value) and words in str(refused.value)


def test_card_that_is_not_an_object_is_refused() -> None:
    with pytest.raises(InvalidInputError, match="JSON object"):
        parse_card([CARD])  # type: ignore[arg-type]


# -- storing cards -----------------------------------------------------------------------------------------


def test_card_round_trips_with_its_digest_and_sets_the_risk_class(engine: Engine) -> None:
    add_version(engine, "digits", "2.0")
    with Session(engine) as session:
        high = {**CARD, "risk_class": "high"}
        stored = set_card(session=session, name="digits", version="2.0", card=high, actor="ci")
        assert stored.sha256 == card_digest(stored.card) == card_digest(parse_card({**CARD, "risk_class": "high"}))
    with Session(engine) as session:
        record, card = get_card(session=session, name="digits", version="2.0")
        assert card.card["intended_use"] == CARD["intended_use"] and card.card["metrics"]["agreement_int8"] == 1.0
        assert card.updated_by == "ci" and card.sha256 == stored.sha256
        assert (record.risk_class, record.signing_state) == ("high", "unsigned")


def test_card_without_a_risk_class_keeps_the_version_s_own(engine: Engine) -> None:
    add_version(engine, "digits", "2.0", risk="high")
    without = {k: v for k, v in CARD.items() if k != "risk_class"}
    with Session(engine) as session:
        stored = set_card(session=session, name="digits", version="2.0", card=without, actor="ci")
        assert stored.card["risk_class"] == "high"
    assert version_row(engine, "digits", "2.0").risk_class == "high"


@pytest.mark.parametrize("state", ["awaiting_approval", "signed"])
def test_high_risk_card_cannot_change_once_approvers_sign_it(engine: Engine, state: str) -> None:
    add_version(engine, "digits", "2.0", risk="high")
    high = {**CARD, "risk_class": "high"}
    with Session(engine) as session:
        set_card(session=session, name="digits", version="2.0", card=high, actor="ci")
    set_state(engine, "digits", "2.0", state)  # what the governance signer does once the card is in
    with Session(engine) as session:
        with pytest.raises(ConflictError) as refused:
            set_card(session=session, name="digits", version="2.0", card={**high, "limitations": "none"}, actor="x")
        assert str(refused.value) == f"digits:2.0: {FROZEN_CARD}"
        with pytest.raises(ConflictError):  # nor may it be lowered to escape the approvals
            set_card(session=session, name="digits", version="2.0", card=CARD, actor="x")
        same = set_card(session=session, name="digits", version="2.0", card=high, actor="x")  # a retry: no change
        assert same.updated_by == "ci"
    record = version_row(engine, "digits", "2.0")
    assert (record.risk_class, record.signing_state) == ("high", state)


def test_low_risk_card_edit_sends_a_signed_version_back_to_the_signer(engine: Engine) -> None:
    add_version(engine, "digits", "1.0", state="signed")
    with Session(engine) as session:
        first = set_card(session=session, name="digits", version="1.0", card=CARD, actor="ci")
        first_digest = first.sha256
    assert version_row(engine, "digits", "1.0").signing_state == "unsigned"
    set_state(engine, "digits", "1.0", "signed")  # signed again by the signer, then edited again
    with Session(engine) as session:
        other_owner = {**CARD, "owner": "ml-platform"}
        edited = set_card(session=session, name="digits", version="1.0", card=other_owner, actor="alice")
        assert edited.sha256 != first_digest and edited.updated_by == "alice"
    record = version_row(engine, "digits", "1.0")
    assert (record.risk_class, record.signing_state) == ("low", "unsigned")


def test_card_of_an_unknown_version_is_not_found(engine: Engine) -> None:
    add_version(engine, "digits", "1.0")
    with Session(engine) as session:
        with pytest.raises(NotFoundError, match=re.escape("no version '9.9'")):
            set_card(session=session, name="digits", version="9.9", card=CARD, actor="ci")
        with pytest.raises(NotFoundError, match=re.escape("digits:1.0 has no model card")):
            get_card(session=session, name="digits", version="1.0")


def test_high_risk_version_without_a_card_cannot_be_signed(engine: Engine) -> None:
    add_version(engine, "digits", "1.0")
    add_version(engine, "faces", "2.0", risk="high")
    with Session(engine) as session:
        low = version_row(engine, "digits", "1.0")
        assert require_card(session=session, record=low) is None  # a low-risk version may be signed without one
        high = version_row(engine, "faces", "2.0")
        with pytest.raises(InvalidInputError, match=re.escape("faces:2.0 is high risk and has no model card")):
            require_card(session=session, record=high)
        set_card(session=session, name="faces", version="2.0", card={**CARD, "risk_class": "high"}, actor="ci")
        card = require_card(session=session, record=high)
        assert card is not None and card.card["risk_class"] == "high"


# -- API -----------------------------------------------------------------------------------------------------


def test_card_api_sets_and_shows_the_card_with_its_digest(api: Api) -> None:
    pushed = api.push("digits", "2.0", b"model bytes", inputs=INPUTS, risk_class="high")
    assert (pushed["risk_class"], pushed["signing_state"]) == ("high", "unsigned"), "no card yet: nothing to sign"
    put = api.client.put("/api/v1/models/digits/versions/2.0/card", json={**CARD, "risk_class": "high"})
    assert put.status_code == 200, put.text
    body = put.json()
    assert body["sha256"] == card_digest(parse_card({**CARD, "risk_class": "high"}))
    assert body["risk_class"] == "high" and body["updated_by"] == "admin"
    assert body["signing_state"] == "awaiting_approval", "the signer prepares the approvers' role once the card is in"
    assert api.client.get("/api/v1/models/digits/versions/2.0/card").json() == body
    version = api.client.get("/api/v1/models/digits/versions/2.0").json()
    assert (version["risk_class"], version["signing_state"]) == ("high", "awaiting_approval")

    frozen = api.client.put("/api/v1/models/digits/versions/2.0/card", json={**CARD, "owner": "someone"})
    assert frozen.status_code == 409 and FROZEN_CARD in frozen.json()["detail"]


def test_signed_low_risk_version_cannot_be_raised_to_high_risk_by_its_card(api: Api) -> None:
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    raised = api.client.put("/api/v1/models/digits/versions/1.0/card", json={**CARD, "risk_class": "high"})
    assert raised.status_code == 409 and "push a new version with --risk high" in raised.json()["detail"]
    version = api.client.get("/api/v1/models/digits/versions/1.0").json()
    assert (version["risk_class"], version["signing_state"]) == ("low", "signed")


def test_card_api_refuses_an_invalid_card_naming_the_field(api: Api) -> None:
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    refused = api.client.put("/api/v1/models/digits/versions/1.0/card", json={**CARD, "metrics": {"acc": "x"}})
    assert refused.status_code == 422
    assert refused.json()["field"] == "metrics.acc" and "metrics.acc: " in refused.json()["detail"]
    missing = api.client.get("/api/v1/models/digits/versions/1.0/card")
    assert missing.status_code == 404 and "edgefleet models card digits:1.0" in missing.json()["detail"]
    assert api.client.get("/api/v1/models/digits/versions/9.9/card").status_code == 404


# -- CLI -----------------------------------------------------------------------------------------------------


@pytest.fixture
def edgefleet(api: Api, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`edgefleet ...` run in-process against the `api` fixture's app (the CLI's own client, through a TestClient)."""
    client = ApiClient("http://testserver", token=api.coordinator.admin_token, send=api.anonymous.request)
    for module in (cli.models, cli.approvals):
        monkeypatch.setattr(module, "connect", lambda *_args, **_kwargs: client)

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli.build_app(load_plugins=False), list(args), env={"COLUMNS": "300"})

    return run


def test_cli_card_merges_sets_into_the_current_card_and_a_file(edgefleet: Any, api: Api, tmp_path: Path) -> None:
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    card_file = tmp_path / "card.json"
    card_file.write_text(json.dumps({k: v for k, v in CARD.items() if k != "owner"}))
    from_file = edgefleet("models", "card", "digits:1.0", "--file", str(card_file), "--set", "owner=team-a", "--json")
    assert from_file.exit_code == 0, from_file.output
    assert json.loads(from_file.stdout)["card"]["owner"] == "team-a"

    edited = edgefleet("models", "card", "digits:1.0", "--set", "metrics.accuracy=0.981",
                       "--set", "training_data.licence=CC-BY-4.0", "--set", "reviewed_by=alice", "--json")  # fmt: skip
    assert edited.exit_code == 0, edited.output
    card = json.loads(edited.stdout)["card"]
    assert card["metrics"] == {"accuracy": 0.981, "agreement_int8": 1.0}
    assert card["training_data"]["licence"] == "CC-BY-4.0" and card["training_data"]["images"] == 1797
    assert card["extra"] == {"reviewed_by": "alice"} and card["owner"] == "team-a"

    shown = edgefleet("models", "card", "digits:1.0")
    assert shown.exit_code == 0 and "reviewed_by" in shown.stdout and "team-a" in shown.stdout

    not_a_number = edgefleet("models", "card", "digits:1.0", "--set", "metrics.accuracy=high")
    assert not_a_number.exit_code == 1 and "'high' is not a number" in not_a_number.output
    invalid = edgefleet("models", "card", "digits:1.0", "--set", "owner=")
    assert invalid.exit_code == 1 and "owner: " in invalid.output and "HTTP 422" in invalid.output


def test_cli_card_for_a_version_without_one_starts_from_an_empty_card(edgefleet: Any, api: Api) -> None:
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    partial = edgefleet("models", "card", "digits:1.0", "--set", "owner=team-a")
    assert partial.exit_code == 1 and "intended_use: required" in partial.output


def test_cli_show_json_has_variants_risk_signing_card_and_approvals(edgefleet: Any, api: Api) -> None:
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    bare = json.loads(edgefleet("models", "show", "digits:1.0", "--json").stdout)
    assert bare["card"] is None and bare["risk_class"] == "low" and bare["approvals"]["required"] == 0
    assert bare["signing_state"] == "signed"

    api.push("digits", "2.0", b"model bytes", inputs=INPUTS, risk_class="high")

    api.client.put("/api/v1/models/digits/versions/2.0/card", json={**CARD, "risk_class": "high"})
    shown = edgefleet("models", "show", "digits:2.0", "--json")
    assert shown.exit_code == 0, shown.output
    body = json.loads(shown.stdout)
    assert (body["risk_class"], body["signing_state"]) == ("high", "awaiting_approval")
    assert body["variants"] == [] and body["primary_variant"] == "default"
    assert body["card"]["card"]["owner"] == "vision-team" and len(body["card"]["sha256"]) == 64
    assert body["approvals"]["required"] == 2 and body["approvals"]["deployable"] is False
    text = edgefleet("models", "show", "digits:2.0").stdout
    assert "risk: high" in text and "awaiting_approval" in text and "approvals: 0 of 2" in text
    assert "not deployable: digits:2.0 is high risk and needs 2 approvals" in text


def test_cli_push_high_risk_without_a_card_is_refused_before_uploading(tmp_path: Path) -> None:
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes")
    result = CliRunner().invoke(
        cli.build_app(load_plugins=False),
        ["models", "push", str(model), "-n", "digits", "-v", "2.0", "--risk", "high", "--url", "http://127.0.0.1:9"],
    )
    assert result.exit_code == 1
    assert "a high-risk version needs its model card: pass --card FILE" in result.output
    assert "cannot reach" not in result.output, "refused before any request"


def test_cli_push_with_an_invalid_card_is_refused_before_uploading(tmp_path: Path) -> None:
    model, card = tmp_path / "m.onnx", tmp_path / "card.json"
    model.write_bytes(b"model bytes")
    card.write_text(json.dumps({**CARD, "owner": ""}))
    args = ["models", "push", str(model), "-n", "d", "-v", "1", "--card", str(card), "--url", "http://127.0.0.1:9"]
    invalid = CliRunner().invoke(cli.build_app(load_plugins=False), args)
    assert invalid.exit_code == 1 and "owner: " in invalid.output and "cannot reach" not in invalid.output
    card.write_text(json.dumps(CARD))
    disagree = CliRunner().invoke(cli.build_app(load_plugins=False), [*args, "--risk", "high"])
    assert disagree.exit_code == 1 and "make them agree" in disagree.output


def test_cli_pushes_a_high_risk_model_with_its_card_in_one_command(edgefleet: Any, tmp_path: Path) -> None:
    model, card = tmp_path / "m.onnx", tmp_path / "card.json"
    model.write_bytes(b"model bytes")
    card.write_text(json.dumps({k: v for k, v in CARD.items() if k != "risk_class"}))
    pushed = edgefleet("models", "push", str(model), "-n", "digits", "-v", "2.0", "--inputs", INPUTS,
                       "--risk", "high", "--card", str(card), "--json")  # fmt: skip
    assert pushed.exit_code == 0, pushed.output
    body = json.loads(pushed.stdout)
    assert (body["risk_class"], body["signing_state"]) == ("high", "awaiting_approval")
    assert body["card"]["card"]["risk_class"] == "high"
