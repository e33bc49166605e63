"""The registry's lifecycle on SQLite and PostgreSQL: showing versions with their variants, compression report and
lineage; aliases that deployments and rollouts resolve once; deleting a version only once nothing holds it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session
from tuf.ngclient import Updater

from cloud.errors import NotFoundError
from cloud.services.tokens import create_token
from protocol.governance import high_role
from protocol.manifest import ManifestVariant, VariantsManifest, write_manifest
from protocol.messages import ModelFormat, TensorSpec
from tests.agent.trust_helpers import RepositoryServer
from tests.cloud.cards_helpers import CARD, INPUTS
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api

REPORT = {
    "format_version": 1,
    "max_drop_pp": 1.0,
    "models": [
        {"name": "default", "accuracy": 0.97, "accuracy_drop_pp": 0.0, "gate": "baseline", "accepted": True},
        {"name": "int8", "accuracy": 0.965, "accuracy_drop_pp": 0.5, "gate": "drop 0.50 pp <= 1 pp", "accepted": True},
    ],
    "refused": ["fp16"],
}


@pytest.fixture
def edgefleet(api: Api, monkeypatch: pytest.MonkeyPatch) -> Any:
    """`edgefleet ...` in-process against the `api` fixture's coordinator, as its admin."""
    return in_process_cli(api, monkeypatch)


def push(api: Api, version: str, content: bytes, **fields: str) -> dict[str, Any]:
    return api.push("digits", version, content, inputs=INPUTS, **fields)


def add_variant(api: Api, version: str, variant: str, content: bytes, **fields: str) -> None:
    response = api.client.post(
        f"/api/v1/models/digits/versions/{version}/variants",
        data={"variant": variant, "inputs": INPUTS, **fields},
        files={"file": ("v.onnx", content, "application/octet-stream")},
    )
    assert response.status_code == 201, response.text


def token_of(api: Api, name: str, role: str) -> str:
    from cloud.auth import Role

    with Session(api.coordinator.engine) as session:
        return create_token(session=session, name=name, role=Role(role), created_by="test")[0]


def test_models_show_lists_variants_with_their_compression_report_and_lineage(api: Api, edgefleet: Any) -> None:
    push(api, "1.0", b"version one")
    push(api, "1.1", b"fp32 bytes", report=json.dumps(REPORT))
    add_variant(api, "1.1", "int8", b"int8 bytes", precision="int8", accuracy="0.965", latency_p50_ms="0.02")
    card = {**CARD, "parent_version": "1.0", "run": "compress-2026-11-30"}
    assert api.client.put("/api/v1/models/digits/versions/1.1/card", json=card).status_code == 200

    version = api.client.get("/api/v1/models/digits/versions/1.1").json()
    assert version["lineage"] == {"parent_version": "1.0", "run": "compress-2026-11-30"}
    assert version["created_by"] == "admin" and version["compression_report"] == REPORT
    model = api.client.get("/api/v1/models/digits").json()
    assert [(v["version"], v["lineage"]["parent_version"]) for v in model["versions"]] == [
        ("1.0", None),
        ("1.1", "1.0"),
    ]

    shown = ok_json(edgefleet("models", "show", "digits:1.1", "--json"))
    assert [v["name"] for v in shown["variants"]] == ["int8"] and shown["lineage"]["run"] == "compress-2026-11-30"
    assert shown["card"]["card"]["extra"]["parent_version"] == "1.0" and shown["aliases"] == []
    table = edgefleet("models", "show", "digits:1.1")
    assert table.exit_code == 0, table.output
    int8_row = next(line for line in table.stdout.splitlines() if "int8" in line and "96.50%" in line)
    assert "+0.50" in int8_row and "drop 0.50 pp <= 1 pp" in int8_row
    assert "parent version 1.0, run compress-2026-11-30" in table.stdout and "refused: fp16" in table.stdout
    assert "by admin" in table.stdout

    whole = ok_json(edgefleet("models", "show", "digits", "--json"))
    assert [v["version"] for v in whole["versions"]] == ["1.0", "1.1"] and whole["aliases"] == []
    assert "compress-2026-11-30" in edgefleet("models", "show", "digits").stdout
    missing = edgefleet("models", "show", "digits:9.9")
    assert missing.exit_code == 1 and "model 'digits' has no version '9.9' (HTTP 404)" in missing.output
    assert "digits: must be" not in missing.output


def test_push_of_a_compressed_directory_attaches_its_report_to_the_version(edgefleet: Any, tmp_path: Path) -> None:
    spec = TensorSpec.model_validate(json.loads(INPUTS)[0])
    entries = []
    for name, content in (("fp32", b"fp32 model"), ("int8", b"int8 model")):
        (tmp_path / f"{name}.onnx").write_bytes(content)
        entries.append(
            ManifestVariant(
                name=name,
                file=f"{name}.onnx",
                format=ModelFormat.ONNX,
                precision=name,
                inputs=[spec],
                sha256=hashlib.sha256(content).hexdigest(),
                size=len(content),
            )
        )
    write_manifest(tmp_path, VariantsManifest(max_drop_pp=1.0, variants=entries))
    report = {**REPORT, "models": [{**REPORT["models"][0], "name": "fp32"}, REPORT["models"][1]]}
    (tmp_path / "report.json").write_text(json.dumps(report))

    pushed = ok_json(
        edgefleet("models", "push", "--name", "digits", "--version", "1.2", "--variants", str(tmp_path), "--json")
    )
    assert pushed["compression_report"] == report and [v["name"] for v in pushed["variants"]] == ["int8"]
    table = edgefleet("models", "show", "digits:1.2").stdout
    assert "fp32 (primary)" in table and "drop 0.50 pp <= 1 pp" in table

    (tmp_path / "report.json").write_text("[1, 2]")
    refused = edgefleet("models", "push", "--name", "digits", "--version", "1.3", "--variants", str(tmp_path))
    assert refused.exit_code == 1 and "a compression report is a JSON object" in refused.output


def test_aliases_are_set_moved_and_deleted_with_a_history_of_who_moved_them(api: Api, edgefleet: Any) -> None:
    push(api, "1.0", b"one")
    push(api, "2.0", b"two")
    assert ok_json(edgefleet("models", "alias", "set", "digits", "production", "1.0", "--json"))["version"] == "1.0"
    ci = token_of(api, "ci", "publisher")
    moved = api.anonymous.put(
        "/api/v1/models/digits/aliases/production", json={"version": "2.0"}, headers={"Authorization": f"Bearer {ci}"}
    )
    assert moved.status_code == 200 and moved.json()["updated_by"] == "ci"
    viewer = token_of(api, "watcher", "viewer")
    refused = api.anonymous.put(
        "/api/v1/models/digits/aliases/production",
        json={"version": "1.0"},
        headers={"Authorization": f"Bearer {viewer}"},
    )
    assert refused.status_code == 403
    ok_json(edgefleet("models", "alias", "set", "digits", "staging", "2.0", "--json"))

    listed = ok_json(edgefleet("models", "alias", "list", "digits", "--json"))
    assert listed["count"] == 2 and [(a["alias"], a["version"]) for a in listed["data"]] == [
        ("production", "2.0"),
        ("staging", "2.0"),
    ]
    deleted = ok_json(edgefleet("models", "alias", "delete", "digits", "staging", "--json"))
    assert (deleted["from_version"], deleted["to_version"]) == ("2.0", None)
    history = ok_json(edgefleet("models", "alias", "history", "digits", "--json"))["data"]
    assert [(c["alias"], c["from_version"], c["to_version"], c["changed_by"]) for c in history] == [
        ("production", None, "1.0", "admin"),
        ("production", "1.0", "2.0", "ci"),
        ("staging", None, "2.0", "admin"),
        ("staging", "2.0", None, "admin"),
    ]
    named = ok_json(edgefleet("models", "show", "digits@production", "--json"))
    assert (named["version"], named["aliases"]) == ("2.0", ["production"])
    only = ok_json(edgefleet("models", "alias", "history", "digits", "--alias", "production", "--json"))
    assert only["count"] == 2
    assert "production" in edgefleet("models", "alias", "history", "digits").stdout
    audit = api.client.get("/api/v1/audit", params={"action": "alias.set"}).json()["data"]
    assert [e["subject"] for e in audit] == ["digits@production", "digits@production", "digits@staging"]

    unknown = edgefleet("models", "alias", "set", "digits", "production", "7.0")
    assert unknown.exit_code == 1 and "model 'digits' has no version '7.0' (HTTP 404)" in unknown.output
    gone = edgefleet("models", "alias", "delete", "digits", "staging")
    assert gone.exit_code == 1 and "has no alias 'staging'" in gone.output


def test_deploying_model_at_alias_records_the_version_it_named_then(api: Api, edgefleet: Any) -> None:
    push(api, "1.0", b"one")
    push(api, "2.0", b"two")
    api.report("cam-1", tags={"site": "lab"})
    ok_json(edgefleet("models", "alias", "set", "digits", "production", "1.0", "--json"))

    created = ok_json(edgefleet("deploy", "digits@production", "--to", "site=lab", "--json"))
    assert (created["model_version"], created["model_alias"]) == ("1.0", "production")
    assert "via @production" in edgefleet("deployments", "show", str(created["id"])).stdout
    ok_json(edgefleet("models", "alias", "set", "digits", "production", "2.0", "--json"))
    again = api.client.get(f"/api/v1/deployments/{created['id']}").json()
    assert again["model_version"] == "1.0", "moving the alias later changes nothing that was deployed"
    desired = api.client.get("/api/v1/devices/cam-1").json()["desired_generation"]
    assert desired == 1

    through_api = api.client.post(
        "/api/v1/deployments", json={"model": "digits@production", "target": {"device_ids": ["cam-1"]}}
    )
    assert through_api.status_code == 201 and through_api.json()["model_version"] == "2.0"
    both = api.client.post(
        "/api/v1/deployments",
        json={"model": "digits@production", "version": "1.0", "target": {"device_ids": ["cam-1"]}},
    )
    assert both.status_code == 422 and "leave out version '1.0'" in both.json()["detail"]
    unknown = edgefleet("deploy", "digits@canary", "--to", "cam-1")
    assert unknown.exit_code == 1 and "model 'digits' has no alias 'canary'" in unknown.output
    malformed = edgefleet("deploy", "digits@", "--to", "cam-1")
    assert malformed.exit_code == 1 and "NAME:VERSION or NAME@ALIAS" in malformed.output


def test_rollout_of_model_at_alias_is_created_for_the_version_it_names(api: Api, edgefleet: Any) -> None:
    push(api, "1.0", b"one")
    push(api, "2.0", b"two")
    api.report("cam-1", tags={"site": "lab"})
    ok_json(edgefleet("models", "alias", "set", "digits", "candidate", "2.0", "--json"))
    created = ok_json(
        edgefleet("rollouts", "create", "digits@candidate", "--from", "1.0", "--to", "site=lab", "--json")
    )
    assert (created["model_name"], created["model_version"]) == ("digits", "2.0")
    ok_json(edgefleet("models", "alias", "set", "digits", "candidate", "1.0", "--json"))
    same = api.client.post(
        "/api/v1/rollouts", json={"model": "digits@candidate", "previous_version": "1.0", "selector": {}}
    )
    assert same.status_code == 422 and "previous_version equals the target version" in same.json()["detail"]


def test_delete_is_refused_while_anything_holds_the_version_then_removes_its_unshared_artifacts(
    api: Api, edgefleet: Any
) -> None:
    one = push(api, "1.0", b"primary of 1.0, shared with 2.0")
    add_variant(api, "1.0", "int8", b"int8 of 1.0 only")
    two = push(api, "2.0", b"primary of 2.0")
    add_variant(api, "2.0", "legacy", b"primary of 1.0, shared with 2.0")
    only_one = api.client.get("/api/v1/models/digits/versions/1.0").json()["variants"][0]["sha256"]
    store = api.coordinator.store
    api.report(
        "cam-1", tags={"site": "lab"}, active_model={"name": "digits", "version": "1.0", "sha256": one["sha256"]}
    )
    api.report("cam-2", tags={"site": "lab"})
    deploy = {"model": "digits", "version": "1.0", "target": {"device_ids": ["cam-2"]}}
    first = api.client.post("/api/v1/deployments", json=deploy).json()["id"]
    ok_json(edgefleet("models", "alias", "set", "digits", "production", "1.0", "--json"))
    rollout = api.client.post("/api/v1/rollouts", json={"model": "digits", "version": "1.0", "selector": {}}).json()

    refused = api.client.delete("/api/v1/models/digits/versions/1.0")
    assert refused.status_code == 409
    detail = refused.json()["detail"]
    assert detail.startswith("cannot delete digits:1.0: devices run it (cam-1)")
    assert "desired state of cam-2" in detail and f"rollout {rollout['id']} (" in detail
    assert "alias digits@production points to it" in detail
    cli_refused = edgefleet("models", "delete", "digits:1.0", "--yes")
    assert cli_refused.exit_code == 1 and "alias digits@production points to it" in cli_refused.output
    assert "Traceback" not in cli_refused.output

    api.client.post(f"/api/v1/rollouts/{rollout['id']}/abort", json={})
    ok_json(edgefleet("models", "alias", "set", "digits", "production", "2.0", "--json"))
    moved = {"model": "digits", "version": "2.0", "target": {"device_ids": ["cam-1", "cam-2"]}}
    assert api.client.post("/api/v1/deployments", json=moved).status_code == 201
    api.report("cam-1", active_model={"name": "digits", "version": "2.0", "sha256": two["sha256"]})
    assert api.client.get(f"/api/v1/rollouts/{rollout['id']}").json()["status"] == "aborted"

    not_confirmed = edgefleet("models", "delete", "digits:1.0", input="n\n")
    assert not_confirmed.exit_code == 1 and store.exists(only_one)
    deleted = ok_json(edgefleet("models", "delete", "digits:1.0", "--yes", "--json"))
    assert deleted["removed_artifacts"] == [only_one] and deleted["kept_artifacts"] == [one["sha256"]]
    assert not store.exists(only_one) and store.exists(one["sha256"]), "bytes 2.0 shares stay"
    assert api.client.get("/api/v1/models/digits/versions/1.0").status_code == 404
    assert [v["version"] for v in api.client.get("/api/v1/models/digits").json()["versions"]] == ["2.0"]
    assert api.client.get("/api/v1/audit", params={"action": "model.deleted"}).json()["data"][0]["subject"] == (
        "digits:1.0"
    )
    assert api.client.get(f"/api/v1/deployments/{first}").json()["model_version"] == "1.0", "history stays"


def test_deleted_version_pushed_again_is_signed_anew_for_tuf_clients(api: Api, tmp_path: Path) -> None:
    push(api, "1.0", b"first bytes")
    assert api.client.delete("/api/v1/models/digits/versions/1.0").status_code == 200
    again = push(api, "1.0", b"second bytes")
    governance = api.coordinator.governance
    assert governance is not None
    engine, repository = api.coordinator.engine, governance.repository
    with Session(engine) as session:
        root = repository.file(session, "1.root.json")
    with RepositoryServer(engine, repository) as server:
        client_dir = tmp_path / "client"
        client_dir.mkdir()
        updater = Updater(
            metadata_dir=str(client_dir), metadata_base_url=f"{server.url}/api/v1/tuf/metadata/", bootstrap=root
        )
        updater.refresh()
        target = updater.get_targetinfo("low/digits/1.0/default.onnx")
    assert target is not None and target.hashes["sha256"] == again["sha256"]


def test_deleting_a_high_risk_version_awaiting_approval_discards_its_pending_role(api: Api) -> None:
    push(api, "3.0", b"high risk bytes", risk_class="high")
    stored = api.client.put("/api/v1/models/digits/versions/3.0/card", json={**CARD, "risk_class": "high"})
    assert stored.status_code == 200, stored.text
    assert api.client.get("/api/v1/models/digits/versions/3.0").json()["signing_state"] == "awaiting_approval"
    governance = api.coordinator.governance
    assert governance is not None
    with Session(api.coordinator.engine) as session:
        governance.repository.pending(session, high_role("digits", "3.0"))
    assert api.client.delete("/api/v1/models/digits/versions/3.0").status_code == 200
    with Session(api.coordinator.engine) as session, pytest.raises(NotFoundError):
        governance.repository.pending(session, high_role("digits", "3.0"))
    assert api.client.get("/api/v1/approvals").json()["count"] == 0
