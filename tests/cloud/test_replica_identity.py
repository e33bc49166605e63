"""Each coordinator replica has a broker identity of its own: a certificate of the fleet CA with CN
`edgefleet:coordinator.<replica>`, which the broker's rights treat as the coordinator, the ACL lists, and
`Settings` refuses names that cannot be one."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID
from sqlalchemy import create_engine
from typer.testing import CliRunner

from cloud.artifacts import FileArtifactStore
from cloud.broker_rights import (
    REPLICA_NAME_MAX,
    Action,
    identity_of,
    mosquitto_acl,
    replica_identity,
    topic_allowed,
    validate_replica_name,
)
from cloud.cli import build_app
from cloud.coordinator import Coordinator
from cloud.pki import FleetPki
from cloud.settings import Settings
from protocol.identity import COORDINATOR_IDENTITY, COORDINATOR_OU, DEVICE_OU, certificate_identity
from protocol.topics import Topics

POSTGRES = "postgresql+psycopg://u@127.0.0.1/db"  # never connected to: Settings only checks the kind
BAD_NAMES = ["", "a b", "-lead", ".hidden", "a/b", "../up", "x\nuser evil", "coord-a\n", "é", "a:b", "n" * 101]


@pytest.fixture
def pki(tmp_path: Path) -> FleetPki:
    return FleetPki(tmp_path / "pki").ensure()


def test_replica_certificate_is_a_coordinator_identity_of_the_fleet_ca(pki: FleetPki) -> None:
    cert_path, key_path = pki.replica_files("coord-a")
    assert cert_path == pki.directory / "coordinators" / "coord-a.crt"
    assert key_path.stat().st_mode & 0o777 == 0o600
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    ca = x509.load_pem_x509_certificate(pki.ca_path.read_bytes())
    cert.verify_directly_issued_by(ca)
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    common_name, unit = certificate_identity(cert_path.read_bytes())
    assert (common_name, unit) == (f"{COORDINATOR_IDENTITY}.coord-a", COORDINATOR_OU)
    identity = identity_of(common_name, unit)
    assert identity is not None and identity.coordinator


def test_replica_certificate_is_kept_across_starts_and_each_replica_has_its_own(pki: FleetPki) -> None:
    first = [path.read_bytes() for path in pki.replica_files("coord-a")]
    again = FleetPki(pki.directory).ensure()  # the next start, or another replica on the same data directory
    assert [path.read_bytes() for path in again.replica_files("coord-a")] == first
    other = x509.load_pem_x509_certificate(again.replica_files("coord-b")[0].read_bytes())
    mine = x509.load_pem_x509_certificate(first[0])
    assert other.public_key() != mine.public_key()
    # The plain coordinator's certificate is untouched: a non-replicated coordinator keeps today's identity.
    assert certificate_identity(pki.coordinator_files()[0].read_bytes()) == (COORDINATOR_IDENTITY, COORDINATOR_OU)


def test_replica_certificate_about_to_expire_is_issued_anew(pki: FleetPki) -> None:
    cert_path, _ = pki.replica_files("coord-a")
    key = ec.generate_private_key(ec.SECP256R1())
    builder = pki._builder(x509.Name.from_rfc4514_string("CN=old"), key.public_key(), days=10)
    cert_path.write_bytes(pki._sign(builder).public_bytes(Encoding.PEM))
    renewed = x509.load_pem_x509_certificate(pki.replica_files("coord-a")[0].read_bytes())
    assert certificate_identity(cert_path.read_bytes())[0] == f"{COORDINATOR_IDENTITY}.coord-a"
    assert (renewed.not_valid_after_utc - renewed.not_valid_before_utc).days > 100


@pytest.mark.parametrize(
    "common_name", [f"{COORDINATOR_IDENTITY}.coord-a", COORDINATOR_IDENTITY, "edgefleet:coordinator.x"]
)
def test_device_certificate_with_a_coordinator_like_name_is_not_a_coordinator(common_name: str) -> None:
    assert identity_of(common_name, DEVICE_OU) is None  # and no device id can spell it (`:`)


@pytest.mark.parametrize(
    "common_name",
    [
        f"{COORDINATOR_IDENTITY}.",
        f"{COORDINATOR_IDENTITY}..x",
        f"{COORDINATOR_IDENTITY}-coord-a",
        f"{COORDINATOR_IDENTITY}coord-a",
        f"{COORDINATOR_IDENTITY}.a b",
        f"{COORDINATOR_IDENTITY}.{'n' * (REPLICA_NAME_MAX + 1)}",
        "coord-a",
    ],
)
def test_coordinator_unit_with_a_name_no_replica_can_have_is_nobody(common_name: str) -> None:
    assert identity_of(common_name, COORDINATOR_OU) is None


def test_replica_has_the_coordinators_rights_on_every_topic_under_the_base() -> None:
    identity = identity_of(replica_identity("coord-a"), COORDINATOR_OU)
    assert identity is not None
    topics = Topics("fleet")
    for action in Action:
        assert topic_allowed(identity, topics, "fleet/devices/cam-1/desired", action)
        assert topic_allowed(identity, topics, "fleet/#", action)
        assert not topic_allowed(identity, topics, "other/devices/cam-1/desired", action)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_replica_name_outside_the_safe_characters_is_refused_with_the_rule(name: str) -> None:
    with pytest.raises(ValueError, match="use 1-100 characters from A-Z a-z 0-9"):
        validate_replica_name(name)
    with pytest.raises(ValueError, match="invalid replica name"):
        Settings(replica=name)


def test_replica_name_too_long_for_a_certificate_is_refused_only_when_replicated() -> None:
    longest, too_long = "n" * REPLICA_NAME_MAX, "n" * (REPLICA_NAME_MAX + 1)
    assert len(replica_identity(longest)) == 64  # X.509's limit for a CN
    with pytest.raises(ValueError, match=f"at most {REPLICA_NAME_MAX}"):
        replica_identity(too_long)
    with pytest.raises(ValueError, match=f"give --replica a name of at most {REPLICA_NAME_MAX}"):
        Settings(replicated=True, replica=too_long, mqtt_url="mqtts://b:8883", database_url=POSTGRES)
    # Alone on its database, a coordinator's (default) replica name never reaches a certificate.
    assert Settings(replica=too_long).replica == too_long


def test_mosquitto_acl_gives_each_listed_replica_the_coordinators_rights() -> None:
    acl = mosquitto_acl(Topics("fleet"), (COORDINATOR_IDENTITY, replica_identity("coord-a")))
    blocks = acl.split("\n\n")
    assert f"user {COORDINATOR_IDENTITY}\ntopic readwrite fleet/#" in blocks
    assert f"user {COORDINATOR_IDENTITY}.coord-a\ntopic readwrite fleet/#\n" in blocks


def test_mosquitto_config_lists_every_replica_in_the_acl(tmp_path: Path) -> None:
    out = tmp_path / "mosquitto"
    args = ["broker", "mosquitto-config", "--out", str(out), "--data-dir", str(tmp_path / "data"), "--user", ""]
    args += ["--topic-base", "fleet", "--replica", "coord-a", "--replica", "coord-b", "--replica", "coord-a", "--json"]
    result = CliRunner().invoke(build_app(), args)
    assert result.exit_code == 0, result.output
    coordinators = [COORDINATOR_IDENTITY, f"{COORDINATOR_IDENTITY}.coord-a", f"{COORDINATOR_IDENTITY}.coord-b"]
    assert json.loads(result.stdout)["coordinators"] == coordinators
    users = [line for line in (out / "acl").read_text().splitlines() if line.startswith("user ")]
    assert users == [f"user {name}" for name in coordinators]
    conf = (out / "mosquitto.conf").read_text()
    assert "use_identity_as_username true" in conf and "use_username_as_clientid true" in conf


def test_mosquitto_config_refuses_a_replica_name_that_cannot_be_a_certificate(tmp_path: Path) -> None:
    args = ["broker", "mosquitto-config", "--out", str(tmp_path / "m"), "--data-dir", str(tmp_path / "d")]
    result = CliRunner().invoke(build_app(), [*args, "--replica", "a b"])
    assert result.exit_code == 1
    assert "--replica: invalid replica name 'a b'" in result.output
    assert not (tmp_path / "m").exists(), "nothing written"


def test_mosquitto_config_help_says_replicas_need_stable_matching_names() -> None:
    result = CliRunner().invoke(build_app(), ["broker", "mosquitto-config", "--help"], terminal_width=200)
    assert "--replica" in result.output
    assert "stable" in result.output


def coordinator_of(settings: Settings) -> Coordinator:
    store = FileArtifactStore(settings.data_dir / "artifacts")
    return Coordinator(settings=settings, engine=create_engine("sqlite://"), store=store)


def test_replicated_bridge_presents_the_replicas_own_certificate(tmp_path: Path) -> None:
    settings = Settings.load(
        data_dir=tmp_path, replicated=True, replica="coord-a", mqtt_url="mqtts://b:8883", database_url=POSTGRES
    )
    cert, key = coordinator_of(settings).bridge_certificate()
    issued = tmp_path / "pki" / "coordinators"
    assert (cert, key) == (issued / "coord-a.crt", issued / "coord-a.key")
    assert certificate_identity(cert.read_bytes())[0] == f"{COORDINATOR_IDENTITY}.coord-a"


def test_coordinator_alone_keeps_its_one_certificate(tmp_path: Path) -> None:
    coordinator = coordinator_of(Settings.load(data_dir=tmp_path))
    assert coordinator.bridge_certificate() == coordinator.fleet_pki().coordinator_files()
    assert not (tmp_path / "pki" / "coordinators").exists()


def test_replica_with_the_default_name_warns_that_the_brokers_acl_must_list_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings.load(data_dir=tmp_path, replicated=True, mqtt_url="mqtts://b:8883", database_url=POSTGRES)
    with caplog.at_level(logging.WARNING, logger="cloud.coordinator"):
        coordinator_of(settings).bridge_certificate()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert f"replica name {settings.replica} is the default" in warning
    assert f"cn={COORDINATOR_IDENTITY}.{settings.replica}" in warning
    assert "--replica NAME" in warning
