"""Enrolment through the public API, attacked: replayed, expired and misdirected tokens, claimed ids, foreign keys.

The device side is the real `agent.identity` code (key made on the device, CSR over HTTP) where it can be;
the coordinator is the real app on SQLite and PostgreSQL.
"""

from __future__ import annotations

from datetime import timedelta

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from sqlmodel import Session, select

from cloud.models import EnrolmentToken
from protocol.identity import certificate_identity
from protocol.messages import utcnow
from tests.cloud.conftest import Api


def csr(device_id: str, key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey | None = None) -> tuple[str, object]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    request = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, device_id)]))
        .sign(key, hashes.SHA256())
    )
    return request.public_bytes(serialization.Encoding.PEM).decode(), key


def token_for(api: Api, device_id: str, **body: object) -> str:
    response = api.client.post(f"/api/v1/devices/{device_id}/enrolment-token", json=body)
    assert response.status_code == 201, response.text
    return str(response.json()["token"])


def enrol(api: Api, device_id: str, *, token: str | None = None, secret: str | None = None, pem: str | None = None):  # type: ignore[no-untyped-def]
    body = {"device_id": device_id, "csr_pem": pem or csr(device_id)[0], "token": token, "bootstrap_secret": secret}
    return api.anonymous.post("/api/v1/enrolment", json=body)


def test_enrolment_gives_a_certificate_naming_the_enrolled_device_and_the_fleets_tags(api: Api) -> None:
    token = token_for(api, "cam-1", tags={"site": "lab"})
    assert api.client.get("/api/v1/devices/cam-1").json()["enrolment"] == "pending"
    pem, _ = csr("someone-else")  # the CSR asks for another name: the coordinator names the device itself
    answer = enrol(api, "cam-1", token=token, pem=pem)
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert certificate_identity(body["certificate_pem"]) == ("cam-1", "device")
    assert body["tags"] == {"site": "lab"} and body["ca_pem"].startswith("-----BEGIN CERTIFICATE-----")
    assert api.client.get("/api/v1/devices/cam-1").json()["enrolment"] == "enrolled"


def test_replayed_enrolment_token_is_refused(api: Api) -> None:
    token = token_for(api, "cam-1")
    assert enrol(api, "cam-1", token=token).status_code == 200
    replay = enrol(api, "cam-1", token=token)
    assert replay.status_code == 401 and "used already" in replay.json()["detail"]


def test_expired_enrolment_token_is_refused(api: Api) -> None:
    token = token_for(api, "cam-1")
    with Session(api.coordinator.engine) as session:
        record = session.exec(select(EnrolmentToken)).one()
        record.expires_at = utcnow() - timedelta(seconds=1)
        session.add(record)
        session.commit()
    refused = enrol(api, "cam-1", token=token)
    assert refused.status_code == 401 and "expired" in refused.json()["detail"]
    assert api.client.get("/api/v1/devices/cam-1").json()["enrolment"] == "pending"


def test_token_of_one_device_cannot_enrol_another(api: Api) -> None:
    token = token_for(api, "cam-1")
    refused = enrol(api, "cam-2", token=token)
    assert refused.status_code == 401
    assert api.client.get("/api/v1/devices/cam-2").status_code == 404


def test_enrolled_device_cannot_be_given_a_second_token_without_revoking_it(api: Api) -> None:
    assert enrol(api, "cam-1", token=token_for(api, "cam-1")).status_code == 200
    again = api.client.post("/api/v1/devices/cam-1/enrolment-token", json={})
    assert again.status_code == 409 and "revoke it first" in again.json()["detail"]


def test_csr_with_a_weak_or_broken_key_is_refused(api: Api) -> None:
    weak, _ = csr("cam-1", rsa.generate_private_key(public_exponent=65537, key_size=2048))
    refused = enrol(api, "cam-1", token=token_for(api, "cam-1"), pem=weak)
    assert refused.status_code == 422 and "P-256" in refused.json()["detail"]
    garbage = enrol(api, "cam-2", token=token_for(api, "cam-2"), pem="not a csr")
    assert garbage.status_code == 422 and "csr_pem" in garbage.json()["detail"]
    assert api.client.get("/api/v1/devices/cam-2").json()["enrolment"] == "pending", "a refused CSR used the token"


def test_bootstrap_secret_enrols_new_ids_only_and_stops_when_revoked(api: Api) -> None:
    created = api.client.post("/api/v1/bootstrap-secrets", json={"name": "batch-7", "tags": {"site": "plant"}})
    assert created.status_code == 201, created.text
    secret = created.json()["secret"]
    assert secret not in api.client.get("/api/v1/bootstrap-secrets").text
    first = enrol(api, "line-1", secret=secret)
    assert first.status_code == 200 and first.json()["tags"] == {"site": "plant"}
    token_for(api, "line-2")  # an operator's token claims line-2: the bootstrap secret cannot take it
    assert enrol(api, "line-2", secret=secret).status_code == 401
    assert enrol(api, "line-1", secret=secret).status_code == 401, "an enrolled id was claimed twice"
    assert api.client.post("/api/v1/bootstrap-secrets/batch-7/revoke").status_code == 200
    assert enrol(api, "line-3", secret=secret).status_code == 401


def test_renewal_needs_the_key_of_a_current_certificate(api: Api) -> None:
    pem, key = csr("cam-1")
    assert enrol(api, "cam-1", token=token_for(api, "cam-1"), pem=pem).status_code == 200
    same_key, _ = csr("cam-1", key)  # type: ignore[arg-type]
    renewed = api.anonymous.post("/api/v1/enrolment/renew", json={"device_id": "cam-1", "csr_pem": same_key})
    assert renewed.status_code == 200, renewed.text
    other_key, _ = csr("cam-1")
    stolen = api.anonymous.post("/api/v1/enrolment/renew", json={"device_id": "cam-1", "csr_pem": other_key})
    assert stolen.status_code == 401, "a key the fleet never certified got a certificate"


def test_revoked_device_goes_on_the_crl_and_cannot_renew(api: Api) -> None:
    pem, key = csr("cam-1")
    serial = x509.load_pem_x509_certificate(
        enrol(api, "cam-1", token=token_for(api, "cam-1"), pem=pem).json()["certificate_pem"].encode()
    ).serial_number
    assert api.client.post("/api/v1/devices/cam-1/revoke").json()["enrolment"] == "revoked"
    crl = x509.load_pem_x509_crl(api.anonymous.get("/api/v1/pki/crl.pem").content)
    assert crl.get_revoked_certificate_by_serial_number(serial) is not None
    same_key, _ = csr("cam-1", key)  # type: ignore[arg-type]
    assert (
        api.anonymous.post("/api/v1/enrolment/renew", json={"device_id": "cam-1", "csr_pem": same_key}).status_code
        == 401
    )
    kinds = [e["kind"] for e in api.client.get("/api/v1/devices/cam-1/events").json()["data"]]
    assert kinds[-1] == "device.revoked" and "device.enrolled" in kinds
