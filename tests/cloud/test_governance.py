"""Governance on the coordinator: what gets signed when, who may approve, key ceremonies, fresh metadata, audit.

Device-side verification of the same metadata is in tests/agent/test_trust_gate.py and, through real agents on
both brokers, tests/e2e/test_governance.py.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlmodel import Session
from tuf.api.metadata import Metadata, Targets
from tuf.ngclient import Updater
from typer.testing import CliRunner

from cloud import cli
from cloud.errors import ConfigurationError
from cloud.governance.keys import generate_encrypted_key, load_encrypted_signer
from cloud.governance.maintainer import GovernanceMaintainer
from cloud.governance.service import Governance
from cloud.models import Device
from cloud.settings import Environment, Settings
from protocol.governance import verify_director
from protocol.messages import DesiredState
from tests.agent.trust_helpers import RepositoryServer
from tests.cloud.cards_helpers import CARD
from tests.cloud.conftest import Api

INPUTS = '[{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]'
PASS = "approver passphrase"


@pytest.fixture
def keys_cli(api: Api, database_url: str) -> Any:
    """`edgefleet keys ...` on the `api` coordinator's data dir and database, root keys unlocked by env."""
    settings = api.coordinator.settings
    root_keys = Path(f"{settings.data_dir.resolve()}.root-keys")
    env = {
        "EDGEFLEET_DATABASE_URL": database_url,
        "ROOT_PASS": (root_keys / "passphrase").read_text().strip(),
        "APPROVER_PASS": PASS,
        "COLUMNS": "300",
    }

    def run(*args: str, root_keys_used: int = 2) -> Any:
        extra: list[str] = []
        if args[0] == "keys" and args[1] not in ("show", "approver-keygen"):
            for index in range(1, root_keys_used + 1):
                extra += ["--root-key", str(root_keys / f"root-{index}.key")]
            extra += ["--passphrase-env", "ROOT_PASS"]
        if args[0] == "keys" and args[1] != "approver-keygen":
            extra += ["--data-dir", str(settings.data_dir)]
        return CliRunner().invoke(cli.build_app(load_plugins=False), [*args, *extra], env=env)

    return run


def make_approver(api: Api, keys_cli: Any, tmp_path: Path, name: str) -> Path:
    key = tmp_path / name / "approver.key"
    key.parent.mkdir()
    generate_encrypted_key(key, key.with_suffix(".pub"), PASS)
    added = keys_cli("keys", "add-approver", name, "--public-key", str(key.with_suffix(".pub")))
    assert added.exit_code == 0, added.output
    return key


def sign_pending(api: Api, version: str, key: Path) -> dict[str, Any]:
    """What `edgefleet approve` sends: the approver's signature over the pending role's signed bytes."""
    pending = api.client.get(f"/api/v1/approvals/digits/{version}/pending")
    assert pending.status_code == 200, pending.text
    md = Metadata[Targets].from_dict(pending.json()["metadata"])
    signature = load_encrypted_signer(key, PASS).sign(md.signed_bytes)
    return {"keyid": signature.keyid, "signature": signature.signature}


def push_high(api: Api, version: str) -> None:
    api.push("digits", version, f"high {version}".encode(), inputs=INPUTS, risk_class="high")
    stored = api.client.put(f"/api/v1/models/digits/versions/{version}/card", json={**CARD, "risk_class": "high"})
    assert stored.status_code == 200, stored.text


def deploy(api: Api, version: str) -> Any:
    return api.client.post(
        "/api/v1/deployments", json={"model": "digits", "version": version, "target": {"device_ids": ["dev-1"]}}
    )


def test_high_risk_version_is_deployable_only_after_k_distinct_approvers_signed_its_exact_metadata(
    api: Api, keys_cli: Any, tmp_path: Path
) -> None:
    api.enrol("dev-1")
    alice, bob = (make_approver(api, keys_cli, tmp_path, n) for n in ("alice", "bob"))
    mallory = tmp_path / "mallory.key"
    generate_encrypted_key(mallory, mallory.with_suffix(".pub"), PASS)
    push_high(api, "2.0")
    url = "/api/v1/approvals/digits/2.0"

    refused = deploy(api, "2.0")
    assert refused.status_code == 409 and "needs 2 approvals" in refused.json()["detail"]

    not_an_approver = api.client.post(url, json=sign_pending(api, "2.0", mallory))
    assert not_an_approver.status_code == 422 and "not one of the fleet's approvers" in not_an_approver.json()["detail"]

    other_content = sign_pending(api, "2.0", alice)
    other_content["signature"] = load_encrypted_signer(alice, PASS).sign(b"something else").signature
    assert api.client.post(url, json=other_content).status_code == 422

    first = api.client.post(url, json=sign_pending(api, "2.0", alice))
    assert first.status_code == 200 and first.json() == {
        "role": "high:digits:2.0",
        "valid": 1,
        "threshold": 2,
        "published": False,
    }
    again = api.client.post(url, json=sign_pending(api, "2.0", alice))
    assert again.status_code == 409 and "counts once" in again.json()["detail"]
    assert deploy(api, "2.0").status_code == 409

    second = api.client.post(url, json=sign_pending(api, "2.0", bob))
    assert second.json()["published"] is True
    assert deploy(api, "2.0").status_code == 201
    version = api.client.get("/api/v1/models/digits/versions/2.0").json()
    assert version["signing_state"] == "signed"

    actions = [e["action"] for e in api.client.get("/api/v1/audit", params={"limit": 100}).json()["data"]]
    for expected in ("approver.added", "model.pushed", "card.updated", "approval.signed", "deployment.created"):
        assert expected in actions, f"{expected} is not in the audit log: {actions}"
    assert api.client.get("/api/v1/audit/verify").json()["ok"] is True


def test_revoked_approver_cannot_approve_and_its_old_signatures_stop_counting(
    api: Api, keys_cli: Any, tmp_path: Path
) -> None:
    api.enrol("dev-1")
    alice, bob, carol = (make_approver(api, keys_cli, tmp_path, n) for n in ("alice", "bob", "carol"))
    push_high(api, "2.0")
    assert api.client.post("/api/v1/approvals/digits/2.0", json=sign_pending(api, "2.0", alice)).status_code == 200

    revoked = keys_cli("keys", "revoke-approver", "alice")
    assert revoked.exit_code == 0, revoked.output
    status = api.client.get("/api/v1/models/digits/versions/2.0/approvals").json()
    assert status["signed_by"] == [], "a revoked approver's signature still counts"
    late = api.client.post("/api/v1/approvals/digits/2.0", json=sign_pending(api, "2.0", alice))
    assert late.status_code == 422 and "not one of the fleet's approvers" in late.json()["detail"]
    for key in (bob, carol):
        assert api.client.post("/api/v1/approvals/digits/2.0", json=sign_pending(api, "2.0", key)).status_code == 200
    assert deploy(api, "2.0").status_code == 201


def test_root_change_signed_below_the_root_threshold_is_refused(api: Api, keys_cli: Any, tmp_path: Path) -> None:
    key = tmp_path / "eve.key"
    generate_encrypted_key(key, key.with_suffix(".pub"), PASS)
    before = keys_cli("keys", "show", "--json")
    result = keys_cli("keys", "add-approver", "eve", "--public-key", str(key.with_suffix(".pub")), root_keys_used=1)
    assert result.exit_code == 1 and "the new root was refused" in result.output
    assert keys_cli("keys", "show", "--json").stdout == before.stdout, "the root changed anyway"


def test_public_key_file_whose_keyid_does_not_match_its_key_is_refused(api: Api, keys_cli: Any, tmp_path: Path) -> None:
    key = tmp_path / "twin.key"
    generate_encrypted_key(key, key.with_suffix(".pub"), PASS)
    public = key.with_suffix(".pub")
    public.write_text(public.read_text().replace('"keyid": "', '"keyid": "0', 1))
    result = keys_cli("keys", "add-approver", "twin", "--public-key", str(public))
    assert result.exit_code == 1 and "is not this key's" in result.output


def test_root_keys_are_refused_inside_the_data_dir(api: Api, keys_cli: Any) -> None:
    inside = api.coordinator.settings.data_dir / "root-keys"
    result = CliRunner().invoke(
        cli.build_app(load_plugins=False),
        ["keys", "init", "--root-keys", str(inside), "--data-dir", str(api.coordinator.settings.data_dir)],
        env={"EDGEFLEET_ROOT_PASSPHRASE": "x" * 12},
    )
    assert result.exit_code == 1 and "must stay apart" in result.output
    assert not inside.exists()


def test_production_coordinator_without_root_metadata_refuses_to_start(tmp_path: Path) -> None:
    from cloud.db import create_db_engine, init_db

    settings = Settings(data_dir=tmp_path / "prod", environment=Environment.PRODUCTION)
    engine = create_db_engine(f"sqlite:///{tmp_path / 'prod.db'}")
    init_db(engine)
    with pytest.raises(ConfigurationError, match="edgefleet keys init"):
        Governance(engine, settings).ensure_initialized()
    assert not Path(f"{settings.data_dir.resolve()}.root-keys").exists(), "production must not make its own root"


class Published(list[DesiredState]):
    def publish_desired(self, state: DesiredState) -> None:
        self.append(state)


def test_director_instructions_of_devices_not_converged_are_renewed_before_they_expire(api: Api) -> None:
    for device in ("behind", "converged"):
        api.enrol(device)
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    created = api.client.post(
        "/api/v1/deployments",
        json={"model": "digits", "version": "1.0", "target": {"device_ids": ["behind", "converged"]}},
    )
    assert created.status_code == 201, created.text
    engine = api.coordinator.engine
    with Session(engine) as session:
        converged = session.get(Device, "converged")
        assert converged is not None
        converged.reported_generation = converged.desired_generation
        session.add(converged)
        session.commit()
    governance = api.coordinator.governance
    assert governance is not None
    assert governance.renew_instructions() == [], "nothing is due right after signing"

    later = datetime.now(UTC) + timedelta(days=5)
    renewed = governance.renew_instructions(now=later)
    assert [s.device_id for s in renewed] == ["behind"]
    with Session(engine) as session:
        device = session.get(Device, "behind")
        assert device is not None and device.desired_state is not None
        stored = DesiredState.model_validate(device.desired_state)
    assert stored == renewed[0] and stored.generation == device.desired_generation
    assert stored.director is not None
    signed = Metadata[Targets].from_bytes(stored.director.encode()).signed
    assert signed.version == stored.generation and signed.expires > later + timedelta(days=6)

    published = Published()
    maintainer = GovernanceMaintainer(governance, published, tick_s=3600)
    maintainer.tick()
    assert published == [], "a fresh instruction is not re-sent"


def test_repository_metadata_is_re_signed_before_it_expires(api: Api) -> None:
    governance = api.coordinator.governance
    assert governance is not None
    repository = governance.repository
    assert repository.refresh() == [], "nothing is due right after start"
    with Session(api.coordinator.engine) as session:
        before = repository.metadata(session, "timestamp").signed
    repository._clock = lambda: datetime.now(UTC) + timedelta(hours=13)
    assert repository.refresh() == ["timestamp"]
    with Session(api.coordinator.engine) as session:
        after = repository.metadata(session, "timestamp").signed
    assert after.version == before.version + 1 and after.expires > before.expires
    repository._clock = lambda: datetime.now(UTC) + timedelta(days=20)
    assert set(repository.refresh()) == {"targets", "low", "snapshot"}


@pytest.mark.parametrize("role", ["timestamp", "targets", "director"])
def test_online_key_rotation_is_followed_by_a_client_that_holds_only_the_first_root(
    api: Api, keys_cli: Any, tmp_path: Path, role: str
) -> None:
    governance = api.coordinator.governance
    assert governance is not None
    api.enrol("dev-1")
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    assert deploy(api, "1.0").status_code == 201
    engine, repository = api.coordinator.engine, governance.repository
    with Session(engine) as session:
        first_root = repository.file(session, "1.root.json")
    rotated = keys_cli("keys", "rotate", role)
    assert rotated.exit_code == 0, rotated.output

    with RepositoryServer(engine, repository) as server:
        client_dir = tmp_path / "client"
        client_dir.mkdir()
        updater = Updater(
            metadata_dir=str(client_dir), metadata_base_url=f"{server.url}/api/v1/tuf/metadata/", bootstrap=first_root
        )
        updater.refresh()  # walks 1.root.json -> 2.root.json, then verifies everything with the new keys
        assert updater.get_targetinfo("low/digits/1.0/default.onnx") is not None
    with Session(engine) as session:
        root = repository.root(session)
    assert root.version == 2

    renewed = governance.renew_instructions()
    if role == "director":  # instructions in flight were signed by the old key: re-signed at once
        assert [s.device_id for s in renewed] == ["dev-1"]
        assert renewed[0].director is not None
        assert verify_director(root, renewed[0].director, "dev-1").version == renewed[0].generation
    else:
        assert renewed == []


def test_targets_carry_the_versions_card_digest_and_lineage(api: Api) -> None:
    api.push("digits", "1.1", b"model bytes", inputs=INPUTS)
    card = {**CARD, "risk_class": "low", "parent_version": "1.0", "run": "train-2026-11-30"}
    stored = api.client.put("/api/v1/models/digits/versions/1.1/card", json=card)
    assert stored.status_code == 200, stored.text
    governance = api.coordinator.governance
    assert governance is not None
    with Session(api.coordinator.engine) as session:
        low = governance.repository.metadata(session, "low").signed
    target = low.targets["low/digits/1.1/default.onnx"]
    custom = target.unrecognized_fields["custom"]
    assert custom["card_sha256"] == stored.json()["sha256"]
    assert custom["lineage"] == {"parent_version": "1.0", "run": "train-2026-11-30", "variant_of": None}
    assert (custom["model"], custom["version"], custom["variant"], custom["format"], custom["risk"]) == (
        "digits",
        "1.1",
        "default",
        "onnx",
        "low",
    )
