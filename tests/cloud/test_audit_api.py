"""The audit log through the API and the CLI: real actions leave a chain that verifies, each with its actor;
tampering shows in `edgefleet audit verify` (exit 1); the commands of docs/governance.md run as written."""

from __future__ import annotations

import re
import shlex
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from sqlmodel import col
from typer.testing import CliRunner

import cloud.cli as cli
from cloud.models import AuditEntry
from tests.cloud.conftest import Api
from tests.cloud.test_enrolment import csr, enrol, token_for

DOC = Path(__file__).resolve().parents[2] / "docs" / "governance.md"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def new_token(api: Api, name: str, role: str) -> str:
    response = api.client.post("/api/v1/tokens", json={"name": name, "role": role})
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def entries(api: Api) -> list[dict[str, Any]]:
    body = api.client.get("/api/v1/audit", params={"after_seq": 0, "limit": 1000}).json()
    assert body["count"] == len(body["data"]) and body["head_seq"] == (body["data"][-1]["seq"] if body["data"] else 0)
    return list(body["data"])


def wait_for_status(api: Api, rollout_id: int, status: str) -> None:
    deadline = time.monotonic() + 20
    while api.client.get(f"/api/v1/rollouts/{rollout_id}").json()["status"] != status:
        assert time.monotonic() < deadline, f"rollout {rollout_id} never became {status}"
        time.sleep(0.1)


def device_actions(api: Api, ops: str) -> None:
    """Enrol a device with a token and one with a bootstrap secret, renew, revoke (the operator's token `ops`)."""
    response = api.anonymous.post("/api/v1/devices/cam-1/enrolment-token", json={}, headers=bearer(ops))
    assert response.status_code == 201, response.text
    pem, key = csr("cam-1")
    assert enrol(api, "cam-1", token=response.json()["token"], pem=pem).status_code == 200
    renewal = {"device_id": "cam-1", "csr_pem": csr("cam-1", key)[0]}  # type: ignore[arg-type]
    assert api.anonymous.post("/api/v1/enrolment/renew", json=renewal).status_code == 200
    assert api.anonymous.post("/api/v1/devices/cam-1/revoke", headers=bearer(ops)).status_code == 200
    secret = api.client.post("/api/v1/bootstrap-secrets", json={"name": "batch-7", "tags": {"site": "plant"}})
    assert secret.status_code == 201, secret.text
    assert enrol(api, "cam-2", secret=secret.json()["secret"]).status_code == 200
    assert api.client.post("/api/v1/bootstrap-secrets/batch-7/revoke").status_code == 200


def rollout_actions(api: Api, ops: str, model_bytes: bytes) -> int:
    """A rollout of digits 1.0 to two devices, paused, resumed, promoted and aborted by `ops`."""
    api.push("digits", "1.0", model_bytes)
    for device_id in ("cam-3", "cam-4"):
        api.enrol(device_id, {"site": "lab"})
    plan = {"model": "digits", "version": "1.0", "waves": [{"count": 1, "bake_seconds": 600}, {"percent": 100}]}
    created = api.anonymous.post("/api/v1/rollouts", json=plan, headers=bearer(ops))
    assert created.status_code == 201, created.text
    rollout_id = int(created.json()["id"])
    wait_for_status(api, rollout_id, "running")
    for command in ("pause", "resume", "promote", "abort"):
        answer = api.anonymous.post(f"/api/v1/rollouts/{rollout_id}/{command}", headers=bearer(ops))
        assert answer.status_code in (200, 202), f"{command}: {answer.text}"
        if command == "pause":
            wait_for_status(api, rollout_id, "paused")
        if command == "resume":
            wait_for_status(api, rollout_id, "running")
    return rollout_id


def test_chain_of_real_actions_verifies(api: Api, digits_model_bytes: bytes) -> None:
    ops = new_token(api, "ops", "operator")
    viewer = new_token(api, "auditor", "viewer")
    device_actions(api, ops)
    rollout_id = rollout_actions(api, ops, digits_model_bytes)
    assert api.client.delete("/api/v1/tokens/auditor").status_code == 200
    expected = [
        ("token.created", "admin", "ops"),
        ("token.created", "admin", "auditor"),
        ("enrolment_token.created", "ops", "cam-1"),
        ("device.enrolled", "device:cam-1", "cam-1"),
        ("device.certificate_renewed", "device:cam-1", "cam-1"),
        ("device.revoked", "ops", "cam-1"),
        ("bootstrap_secret.created", "admin", "batch-7"),
        ("device.enrolled", "device:cam-2", "cam-2"),
        ("bootstrap_secret.revoked", "admin", "batch-7"),
        *[(f"rollout.{a}", "ops", str(rollout_id)) for a in ("created", "paused", "resumed", "promoted", "aborted")],
        ("token.revoked", "admin", "auditor"),
    ]
    mine = {action for action, _, _ in expected}
    logged = [(e["action"], e["actor"], e["subject"]) for e in entries(api) if e["action"] in mine]
    assert logged == expected  # other services (models, governance) may add entries of their own in between
    enrolled = [e for e in entries(api) if e["action"] == "device.enrolled"]
    assert [e["details"]["via"] for e in enrolled] == ["enrolment_token", "bootstrap_secret"]
    assert enrolled[1]["details"]["bootstrap_secret"] == "batch-7"

    report = api.anonymous.get("/api/v1/audit/verify", headers=bearer(ops)).json()
    assert report["ok"], report["problems"]
    signed = api.client.post("/api/v1/audit/checkpoint").json()
    assert signed["seq"] == report["head_seq"] and len(signed["signature"]) == 128
    again = api.anonymous.get("/api/v1/audit/verify", headers=bearer(ops)).json()
    assert again["ok"] and again["latest_checkpoint_seq"] == again["head_file_seq"] == report["head_seq"]
    assert api.anonymous.get("/api/v1/audit", headers=bearer(viewer)).status_code == 401  # revoked meanwhile


def test_a_refused_action_leaves_no_entry(api: Api) -> None:
    new_token(api, "ci", "publisher")
    before = entries(api)
    assert api.client.post("/api/v1/tokens", json={"name": "ci", "role": "viewer"}).status_code == 409
    assert api.client.post("/api/v1/rollouts", json={"model": "nomodel", "version": "1"}).status_code == 404
    assert api.client.post("/api/v1/bootstrap-secrets/nothing/revoke").status_code == 404
    assert enrol(api, "cam-9", token="eft_wrong").status_code == 401
    assert entries(api) == before


def test_audit_listing_pages_and_filters(api: Api) -> None:
    for n in range(5):
        new_token(api, f"t{n}", "viewer")
    token_for(api, "cam-1")
    newest = api.client.get("/api/v1/audit", params={"limit": 2}).json()
    assert [e["seq"] for e in newest["data"]] == [5, 6] and newest["head_seq"] == 6
    page = api.client.get("/api/v1/audit", params={"after_seq": 2, "limit": 2}).json()
    assert [e["seq"] for e in page["data"]] == [3, 4]
    only = api.client.get("/api/v1/audit", params={"action": "enrolment_token.created"}).json()
    assert [e["subject"] for e in only["data"]] == ["cam-1"]
    assert api.client.get("/api/v1/audit", params={"actor": "nobody"}).json()["count"] == 0
    assert api.client.get("/api/v1/audit", params={"limit": 0}).status_code == 422


def test_checkpoint_of_an_empty_log_is_refused(api: Api) -> None:
    answer = api.client.post("/api/v1/audit/checkpoint")
    assert answer.status_code == 409 and "no entries yet" in answer.json()["detail"]


# -- the CLI -----------------------------------------------------------------------------------------


@pytest.fixture
def edgefleet(api: Api, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Run `edgefleet ...` (a command line) against the test app; returns (exit code, output)."""

    def request(method: str, url: str, **kwargs: Any) -> Any:
        kwargs.pop("timeout", None)  # the TestClient has none
        return api.anonymous.request(method, url, **kwargs)

    monkeypatch.setattr(httpx, "request", request)
    env = {"EDGEFLEET_URL": "http://testserver", "EDGEFLEET_TOKEN": api.coordinator.admin_token, "COLUMNS": "200"}

    def run(line: str) -> tuple[int, str]:
        result = CliRunner().invoke(cli.build_app(load_plugins=False), shlex.split(line)[1:], env=env)
        return result.exit_code, result.output

    yield run


def test_cli_lists_verifies_and_checkpoints(api: Api, edgefleet: Any) -> None:
    new_token(api, "ci", "publisher")
    token_for(api, "cam-1", tags={"site": "lab"})
    code, out = edgefleet("edgefleet audit list")
    assert code == 0 and "token.created" in out and "enrolment_token.created" in out and "cam-1" in out
    code, out = edgefleet("edgefleet audit verify")
    assert code == 0 and out.startswith("OK: 2 entries"), out
    code, out = edgefleet("edgefleet audit checkpoint")
    assert code == 0 and out.startswith("checkpoint at seq 2"), out


def test_cli_verify_fails_on_an_edited_entry(api: Api, edgefleet: Any) -> None:
    new_token(api, "ci", "publisher")
    new_token(api, "cd", "operator")
    with api.coordinator.engine.begin() as connection:
        connection.execute(update(AuditEntry).where(col(AuditEntry.seq) == 1).values(actor="mallory"))
    code, out = edgefleet("edgefleet audit verify")
    assert code == 1 and "seq 1: edited" in out and "token.created by mallory" in out, out
    code, out = edgefleet("edgefleet audit verify --json")
    assert code == 1 and '"kind": "edited"' in out


def doc_commands() -> list[str]:
    section = DOC.read_text().split("## Audit log", 1)[1]
    block = re.search(r"```sh\n(.*?)```", section, re.S)
    assert block, "docs/governance.md's audit section starts with a sh block of its commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_the_docs_commands_run_as_written(api: Api, edgefleet: Any) -> None:
    new_token(api, "ci", "publisher")
    assert len(doc_commands()) == 4
    for line in doc_commands():
        code, out = edgefleet(line)
        assert code == 0, f"{line}: {out}"
