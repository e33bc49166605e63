"""The deploy policy of governance: what a version lacks before it may be deployed, said in one line.

Approvers and their signatures are made here as rows (the signing code makes them for real); the policy only
counts them: distinct approvers, keys not revoked, over the role's current metadata.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from sqlalchemy.engine import Engine
from sqlmodel import Session
from typer.testing import CliRunner

import cloud.cli as cli
from cloud.client import ApiClient
from cloud.errors import ConflictError
from cloud.models import ModelCard, TufMetadata
from cloud.services.approvals import Facts, approval_status, ensure_deployable, high_role, judge, list_approvals
from tests.cloud.cards_helpers import (
    CARD,
    INPUTS,
    add_approvers,
    add_version,
    set_state,
    sign,
    version_row,
)
from tests.cloud.conftest import Api

ROLE = high_role("digits", "2.0")


def refusal(engine: Engine, name: str = "digits", version: str = "2.0", threshold: int = 2) -> str | None:
    """`ensure_deployable`'s message for the version, or None when it may be deployed."""
    with Session(engine) as session:
        try:
            ensure_deployable(session=session, record=version_row(engine, name, version), threshold=threshold)
        except ConflictError as exc:
            return str(exc)
    return None


def high_version_awaiting_approval(engine: Engine) -> None:
    """digits:2.0, high risk, with a card, waiting for approvers alice, bob and carol."""
    add_version(engine, "digits", "2.0", risk="high", state="awaiting_approval")
    add_approvers(engine, "alice", "bob", "carol")


def test_the_role_approvers_sign_is_named_after_the_version() -> None:
    assert high_role("digits", "2.0") == "high:digits:2.0"


# -- the decision, as a table ---------------------------------------------------------------------------------

APPROVERS = ("alice", "bob", "carol")


@pytest.mark.parametrize(
    ("risk", "state", "has_card", "signed_by", "reason"),
    [
        ("low", "signed", True, (), None),
        ("low", "signed", False, (), None),
        ("high", "signed", True, ("alice", "bob"), None),
        ("high", "signed", True, ("alice", "bob", "carol"), None),
        ("low", "unsigned", False, (),
         "digits:2.0 is not signed yet: the governance signer has not signed it (signing failed or is pending; "
         "see the coordinator's log)"),
        ("high", "unsigned", False, (),
         "digits:2.0 is not signed yet: no model card for a high-risk version (add one: "
         "`edgefleet models card digits:2.0 --file card.json`)"),
        ("high", "unsigned", True, (), "digits:2.0 is not signed yet: the governance signer has not signed it"),
        ("high", "awaiting_approval", True, (),
         "digits:2.0 is high risk and needs 2 approvals; it has 0; missing 2 more of: alice, bob, carol"),
        ("high", "awaiting_approval", True, ("alice",),
         "digits:2.0 is high risk and needs 2 approvals; it has 1 (alice); missing 1 more of: bob, carol"),
        ("high", "awaiting_approval", True, ("alice", "bob"),
         "digits:2.0 has the 2 approvals it needs but is not signed yet"),
        ("high", "signed", True, ("carol",),
         "digits:2.0 is high risk and needs 2 approvals; it has 1 (carol); missing 1 more of: alice, bob "
         "(it was signed before approvers were revoked or the threshold was raised)"),
        ("high", "withdrawn", True, (), "digits:2.0 has signing state 'withdrawn'; only signed versions may be"),
    ],
)  # fmt: skip
def test_policy_decides_from_state_card_and_approvals(
    risk: str, state: str, has_card: bool, signed_by: tuple[str, ...], reason: str | None
) -> None:
    facts = Facts("digits", "2.0", risk, state, has_card, signed_by, APPROVERS)
    status = judge(facts, threshold=2)
    assert status.deployable is (reason is None)
    if reason is None:
        assert status.reason is None
    else:
        assert status.reason is not None and status.reason.startswith(reason), status.reason
    assert status.required == (2 if risk == "high" else 0)
    assert status.role == (ROLE if risk == "high" else None)


def test_too_few_approvers_left_says_to_add_approvers() -> None:
    few = judge(Facts("digits", "2.0", "high", "awaiting_approval", True, (), ("alice", "bob")), threshold=3)
    assert few.reason == (
        "digits:2.0 is high risk and needs 3 approvals; it has 0; missing 3 more of: alice, bob "
        "(only 2 approvers can still approve: add approvers with `edgefleet keys add-approver`)"
    )
    none = judge(Facts("digits", "2.0", "high", "awaiting_approval", True, (), ()), threshold=2)
    assert none.reason == (
        "digits:2.0 is high risk and needs 2 approvals; it has 0; missing 2 more "
        "(no approver is left to approve: add approvers with `edgefleet keys add-approver`)"
    )


# -- counting approvals in the database --------------------------------------------------------------------------


def test_deploy_is_refused_with_0_and_1_of_2_approvals_and_allowed_with_2(engine: Engine) -> None:
    high_version_awaiting_approval(engine)
    assert refusal(engine) == (
        "digits:2.0 is high risk and needs 2 approvals; it has 0; missing 2 more of: alice, bob, carol"
    )
    sign(engine, ROLE, "alice")
    assert refusal(engine) == (
        "digits:2.0 is high risk and needs 2 approvals; it has 1 (alice); missing 1 more of: bob, carol"
    )
    sign(engine, ROLE, "bob")
    assert "has the 2 approvals it needs but is not signed yet" in (refusal(engine) or "")
    set_state(engine, "digits", "2.0", "signed")  # the signer published the role once the 2nd signature verified
    assert refusal(engine) is None
    with Session(engine) as session:
        status = approval_status(session=session, record=version_row(engine, "digits", "2.0"), threshold=2)
    assert (status.signed_by, status.missing, status.deployable) == (["alice", "bob"], ["carol"], True)


def test_revoked_approver_s_signature_does_not_count(engine: Engine) -> None:
    add_version(engine, "digits", "2.0", risk="high", state="awaiting_approval")
    add_approvers(engine, "alice", "bob", "carol", revoked=("bob",))
    sign(engine, ROLE, "alice")
    sign(engine, ROLE, "bob")
    assert refusal(engine) == (
        "digits:2.0 is high risk and needs 2 approvals; it has 1 (alice); missing 1 more of: carol"
    )
    set_state(engine, "digits", "2.0", "signed")  # signed before bob was revoked: no longer enough
    message = refusal(engine)
    assert message == (
        "digits:2.0 is high risk and needs 2 approvals; it has 1 (alice); missing 1 more of: carol "
        "(it was signed before approvers were revoked or the threshold was raised)"
    )


def test_same_approver_twice_counts_once(engine: Engine) -> None:
    high_version_awaiting_approval(engine)
    sign(engine, ROLE, "alice", version=1)
    sign(engine, ROLE, "alice", version=2)
    assert "it has 1 (alice); missing 1 more of: bob, carol" in (refusal(engine) or "")


def test_signature_of_a_key_that_is_no_approver_does_not_count(engine: Engine) -> None:
    high_version_awaiting_approval(engine)
    sign(engine, ROLE, "mallory")
    sign(engine, high_role("digits", "1.0"), "alice")  # another version's role
    assert "it has 0; missing 2 more of: alice, bob, carol" in (refusal(engine) or "")


def test_signatures_over_an_older_version_of_the_metadata_do_not_count(engine: Engine) -> None:
    high_version_awaiting_approval(engine)
    with Session(engine) as session:
        for version in (1, 2):
            session.add(TufMetadata(role=ROLE, version=version, data="{}", published=version == 1))
        session.commit()
    sign(engine, ROLE, "alice", version=1)  # over other bytes than the ones awaiting approval now
    sign(engine, ROLE, "bob", version=2)
    assert "it has 1 (bob); missing 1 more of: alice, carol" in (refusal(engine) or "")


def test_unsigned_version_says_why(engine: Engine) -> None:
    add_version(engine, "digits", "2.0", risk="high")
    assert refusal(engine) == (
        "digits:2.0 is not signed yet: no model card for a high-risk version "
        "(add one: `edgefleet models card digits:2.0 --file card.json`)"
    )
    with Session(engine) as session:
        record = version_row(engine, "digits", "2.0")
        assert record.id is not None
        session.add(ModelCard(model_version_id=record.id, card=CARD, sha256="00" * 32))
        session.commit()
    assert re.search(r"not signed yet: the governance signer has not signed it \(signing failed", refusal(engine) or "")
    add_version(engine, "digits-low", "1.0", state="signed")
    assert refusal(engine, "digits-low", "1.0") is None


def test_approval_list_shows_every_high_risk_version_not_signed_yet(engine: Engine) -> None:
    add_approvers(engine, "alice", "bob")
    add_version(engine, "digits", "1.0")  # low risk: no approvals to wait for
    add_version(engine, "faces", "2.0", risk="high", state="awaiting_approval")
    add_version(engine, "plates", "1.0", risk="high")  # no card yet
    add_version(engine, "voices", "1.0", risk="high", state="signed")  # approved already
    sign(engine, high_role("faces", "2.0"), "bob")
    with Session(engine) as session:
        listed = list_approvals(session=session, threshold=2)
    assert [(s.name, s.version, s.signed_by, s.missing) for s in listed] == [
        ("faces", "2.0", ["bob"], ["alice"]),
        ("plates", "1.0", [], ["alice", "bob"]),
    ]
    assert listed[1].reason is not None and "no model card" in listed[1].reason


# -- API and CLI ---------------------------------------------------------------------------------------------------


def test_approvals_api_lists_what_high_risk_versions_lack(api: Api) -> None:
    api.push("digits", "2.0", b"model bytes", inputs=INPUTS, risk_class="high")
    api.push("digits", "1.0", b"other bytes", inputs=INPUTS)
    assert api.client.put("/api/v1/models/digits/versions/2.0/card", json={**CARD, "risk_class": "high"}).is_success
    listing = api.client.get("/api/v1/approvals").json()
    assert listing["count"] == 1
    status = listing["data"][0]
    assert (status["name"], status["version"], status["required"], status["deployable"]) == ("digits", "2.0", 2, False)
    assert status["signing_state"] == "awaiting_approval" and status["role"] == "high:digits:2.0"
    one = api.client.get("/api/v1/models/digits/versions/2.0/approvals").json()
    assert one == status
    low = api.client.get("/api/v1/models/digits/versions/1.0/approvals").json()
    assert low["required"] == 0 and low["risk_class"] == "low"
    assert api.client.get("/api/v1/models/digits/versions/9.9/approvals").status_code == 404


@pytest.fixture
def edgefleet(api: Api, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`edgefleet ...` run in-process against the `api` fixture's app."""
    client = ApiClient("http://testserver", token=api.coordinator.admin_token, send=api.anonymous.request)
    monkeypatch.setattr(cli.approvals, "connect", lambda *_args, **_kwargs: client)

    def run(*args: str) -> Any:
        return CliRunner().invoke(cli.build_app(load_plugins=False), list(args), env={"COLUMNS": "300"})

    return run


def test_cli_approvals_list_names_what_is_missing(edgefleet: Any, api: Api) -> None:
    empty = edgefleet("approvals", "list", "--json")
    assert empty.exit_code == 0, empty.output
    assert json.loads(empty.stdout) == {"data": [], "count": 0}
    api.push("digits", "2.0", b"model bytes", inputs=INPUTS, risk_class="high")
    api.client.put("/api/v1/models/digits/versions/2.0/card", json={**CARD, "risk_class": "high"})
    listed = json.loads(edgefleet("approvals", "list", "--json").stdout)
    assert [(s["name"], s["version"], s["required"]) for s in listed["data"]] == [("digits", "2.0", 2)]
    table = edgefleet("approvals", "list")
    assert table.exit_code == 0 and "digits:2.0" in table.stdout and "0/2" in table.stdout
    assert "needs 2 approvals" in table.stdout
