"""The artifact route's delivery: ETag = sha256 for resumes, and 307 to object storage or a CDN when configured."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from sqlmodel import Session

from cloud.auth import artifact_token
from cloud.models import Device
from cloud.settings import Settings
from tests.cloud.conftest import Api

CDN = "https://cdn.example.test/fleet-artifacts"


def test_artifact_etag_is_its_sha256_and_a_resume_with_if_range_gets_the_rest(
    api: Api, digits_model_bytes: bytes
) -> None:
    sha = api.push("digits", "1.0", digits_model_bytes)["sha256"]
    whole = api.client.get(f"/api/v1/artifacts/{sha}")
    assert whole.headers["etag"] == f'"{sha}"'
    assert whole.headers["content-length"] == str(len(digits_model_bytes))
    resumed = api.client.get(f"/api/v1/artifacts/{sha}", headers={"Range": "bytes=1000-", "If-Range": f'"{sha}"'})
    assert resumed.status_code == 206 and resumed.content == digits_model_bytes[1000:]
    stale = api.client.get(f"/api/v1/artifacts/{sha}", headers={"Range": "bytes=1000-", "If-Range": '"other"'})
    assert stale.status_code == 200 and stale.content == digits_model_bytes


def test_with_artifact_base_url_a_checked_download_is_redirected_to_the_digest_on_the_cdn(
    api: Api, digits_model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = str(api.push("digits", "1.0", digits_model_bytes)["sha256"])
    api.enrol("dev-1")
    monkeypatch.setattr(api.coordinator.settings, "artifact_base_url", CDN)

    by_viewer = api.client.get(f"/api/v1/artifacts/{sha}", follow_redirects=False)
    assert by_viewer.status_code == 307 and by_viewer.headers["location"] == f"{CDN}/{sha}"
    token = artifact_token(api.coordinator.artifact_secret, "dev-1", sha)
    by_device = api.anonymous.get(f"/api/v1/artifacts/{sha}?device=dev-1&token={token}", follow_redirects=False)
    assert by_device.status_code == 307 and by_device.headers["location"] == f"{CDN}/{sha}"  # no token in it


def test_with_artifact_base_url_the_caller_is_still_checked_before_any_redirect(
    api: Api, digits_model_bytes: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    sha = str(api.push("digits", "1.0", digits_model_bytes)["sha256"])
    api.enrol("dev-1")
    monkeypatch.setattr(api.coordinator.settings, "artifact_base_url", CDN)

    anonymous = api.anonymous.get(f"/api/v1/artifacts/{sha}", follow_redirects=False)
    assert anonymous.status_code == 401 and "location" not in anonymous.headers
    forged = api.anonymous.get(f"/api/v1/artifacts/{sha}?device=dev-1&token={'0' * 64}", follow_redirects=False)
    assert forged.status_code == 401 and "location" not in forged.headers
    unknown = api.client.get("/api/v1/artifacts/" + "0" * 64, follow_redirects=False)
    assert unknown.status_code == 404


@pytest.mark.parametrize("url", ["ftp://cdn.example.test/a", "cdn.example.test/a", "https://cdn.example.test/a?x=1"])
def test_artifact_base_url_that_is_not_a_plain_http_url_is_refused(url: str) -> None:
    with pytest.raises(ValidationError, match="artifact_base_url"):
        Settings(artifact_base_url=url)


def test_artifact_base_url_loses_its_trailing_slash() -> None:
    assert Settings(artifact_base_url=CDN + "/").artifact_base_url == CDN


@pytest.mark.parametrize("enrolment", ["pending", "revoked", "decommissioned"])
def test_a_device_download_token_is_refused_once_its_device_is_not_enrolled(
    api: Api, digits_model_bytes: bytes, enrolment: str
) -> None:
    sha = str(api.push("digits", "1.0", digits_model_bytes)["sha256"])
    api.enrol("dev-1")
    url = f"/api/v1/artifacts/{sha}?device=dev-1&token={artifact_token(api.coordinator.artifact_secret, 'dev-1', sha)}"
    assert api.anonymous.get(url).content == digits_model_bytes
    with Session(api.coordinator.engine) as session:
        device = session.get(Device, "dev-1")
        assert device is not None
        device.enrolment = enrolment
        session.add(device)
        session.commit()

    refused = api.anonymous.get(url)
    assert refused.status_code == 401 and f"device 'dev-1' is {enrolment}, not enrolled" in refused.text
    stranger = (
        f"/api/v1/artifacts/{sha}?device=dev-9&token={artifact_token(api.coordinator.artifact_secret, 'dev-9', sha)}"
    )
    unknown = api.anonymous.get(stranger)
    assert unknown.status_code == 401 and "device 'dev-9' is not enrolled" in unknown.text
