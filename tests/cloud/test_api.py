"""The REST API on SQLite and PostgreSQL: registry, artifacts with Range, auth, deployments, bad input."""

from __future__ import annotations

import pytest

from tests.cloud.conftest import Api

DIGITS_INPUTS = [{"name": "input", "datatype": "FP32", "shape": [-1, 64]}]
DIGITS_OUTPUTS = [{"name": "probabilities", "datatype": "FP32", "shape": [-1, 10]}]


def test_push_derives_tensors_from_onnx_and_lists_the_version(api: Api, digits_model_bytes: bytes) -> None:
    pushed = api.push("digits", "1.0", digits_model_bytes)
    assert pushed["inputs"] == DIGITS_INPUTS
    assert pushed["outputs"] == DIGITS_OUTPUTS
    assert pushed["size"] == len(digits_model_bytes)
    assert pushed["artifact_url"] == f"http://127.0.0.1:8080/api/v1/artifacts/{pushed['sha256']}"

    listing = api.client.get("/api/v1/models").json()
    assert listing["count"] == 1
    assert [v["version"] for v in listing["data"][0]["versions"]] == ["1.0"]
    assert api.client.get("/api/v1/models/digits").json()["versions"][0]["sha256"] == pushed["sha256"]
    one = api.client.get("/api/v1/models/digits/versions/1.0").json()
    assert one["sha256"] == pushed["sha256"]


def test_same_name_and_version_twice_is_a_conflict(api: Api, digits_model_bytes: bytes) -> None:
    api.push("digits", "1.0", digits_model_bytes)
    response = api.client.post(
        "/api/v1/models/digits/versions",
        data={"version": "1.0"},
        files={"file": ("m.onnx", digits_model_bytes)},
        headers=api.auth,
    )
    assert response.status_code == 409
    assert "exists already" in response.json()["detail"]


def test_rejects_file_that_is_not_onnx_with_a_clear_422(api: Api) -> None:
    response = api.client.post(
        "/api/v1/models/digits/versions",
        data={"version": "1.0"},
        files={"file": ("m.onnx", b"this is not a protobuf \xff\xfe")},
        headers=api.auth,
    )
    assert response.status_code == 422
    assert "not a valid ONNX model" in response.json()["detail"]
    assert api.client.get("/api/v1/models").json()["count"] == 0
    stored = [p for p in (api.coordinator.settings.data_dir / "artifacts").rglob("*") if p.is_file()]
    assert stored == [], "rejected upload left bytes"


def test_explicit_inputs_store_an_invalid_model_as_is(api: Api) -> None:
    import json

    pushed = api.push("broken", "1.0", b"not onnx at all", inputs=json.dumps(DIGITS_INPUTS))
    artifact = api.client.get(f"/api/v1/artifacts/{pushed['sha256']}")
    assert artifact.content == b"not onnx at all"


def test_missing_model_and_version_are_404_with_what_is_missing(api: Api, digits_model_bytes: bytes) -> None:
    assert "does not exist" in api.client.get("/api/v1/models/nope").json()["detail"]
    api.push("digits", "1.0", digits_model_bytes)
    response = api.client.get("/api/v1/models/digits/versions/9.9")
    assert response.status_code == 404
    assert "no version '9.9'" in response.json()["detail"]
    assert api.client.get("/api/v1/artifacts/" + "0" * 64).status_code == 404


def test_range_request_returns_exactly_the_requested_slice(api: Api, digits_model_bytes: bytes) -> None:
    sha = api.push("digits", "1.0", digits_model_bytes)["sha256"]
    response = api.client.get(f"/api/v1/artifacts/{sha}", headers={"Range": "bytes=100-1099"})
    assert response.status_code == 206
    assert response.headers["content-range"] == f"bytes 100-1099/{len(digits_model_bytes)}"
    assert response.content == digits_model_bytes[100:1100]
    tail = api.client.get(f"/api/v1/artifacts/{sha}", headers={"Range": "bytes=-16"})
    assert tail.content == digits_model_bytes[-16:]
    whole = api.client.get(f"/api/v1/artifacts/{sha}")
    assert whole.status_code == 200 and whole.content == digits_model_bytes
    assert whole.headers["accept-ranges"] == "bytes"


def test_unsatisfiable_range_is_416(api: Api, digits_model_bytes: bytes) -> None:
    sha = api.push("digits", "1.0", digits_model_bytes)["sha256"]
    response = api.client.get(f"/api/v1/artifacts/{sha}", headers={"Range": f"bytes={len(digits_model_bytes)}-"})
    assert response.status_code == 416
    assert response.headers["content-range"] == f"bytes */{len(digits_model_bytes)}"


# Who may call which route (every route x every role) is tested in tests/cloud/test_route_roles.py.


def test_deploys_by_device_id_and_bumps_generation(api: Api, digits_model_bytes: bytes) -> None:
    api.push("digits", "1.0", digits_model_bytes)
    api.report("cam-1", tags={"site": "lab"})
    api.report("cam-2", tags={"site": "field"})
    body = {"model": "digits", "version": "1.0", "target": {"device_ids": ["cam-1"]}}
    response = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
    assert response.status_code == 201, response.text
    deployment = response.json()
    assert [(t["device_id"], t["generation"], t["status"]) for t in deployment["targets"]] == [("cam-1", 1, "pending")]
    devices = {d["id"]: d for d in api.client.get("/api/v1/devices").json()["data"]}
    assert devices["cam-1"]["desired_generation"] == 1
    assert devices["cam-2"]["desired_generation"] == 0


def test_deploys_by_tag_to_every_matching_device(api: Api, digits_model_bytes: bytes) -> None:
    api.push("digits", "1.0", digits_model_bytes)
    for device_id, site in [("a1", "lab"), ("a2", "lab"), ("b1", "field")]:
        api.report(device_id, tags={"site": site})
    body = {"model": "digits", "version": "1.0", "target": {"tags": {"site": "lab"}}}
    deployment = api.client.post("/api/v1/deployments", json=body, headers=api.auth).json()
    assert sorted(t["device_id"] for t in deployment["targets"]) == ["a1", "a2"]
    listed = api.client.get("/api/v1/deployments").json()
    assert listed["count"] == 1 and listed["data"][0]["status"] == "in_progress"
    assert api.client.get(f"/api/v1/deployments/{deployment['id']}").json()["id"] == deployment["id"]


def test_deployment_status_follows_reported_state(api: Api, digits_model_bytes: bytes) -> None:
    pushed = api.push("digits", "1.0", digits_model_bytes)
    api.report("ok-1", tags={"site": "lab"})
    api.report("bad-1", tags={"site": "lab"})
    body = {"model": "digits", "version": "1.0", "target": {"tags": {"site": "lab"}}}
    deployment_id = api.client.post("/api/v1/deployments", json=body, headers=api.auth).json()["id"]
    model = {"name": "digits", "version": "1.0", "sha256": pushed["sha256"]}
    api.report("ok-1", tags={"site": "lab"}, active_model=model, update={"generation": 1, "phase": "active"})
    api.report(
        "bad-1",
        tags={"site": "lab"},
        update={"generation": 1, "phase": "failed", "error": {"code": "invalid_model", "message": "no graph"}},
    )
    shown = api.client.get(f"/api/v1/deployments/{deployment_id}").json()
    targets = {t["device_id"]: t for t in shown["targets"]}
    assert targets["ok-1"]["status"] == "succeeded"
    assert (targets["bad-1"]["status"], targets["bad-1"]["error_code"]) == ("failed", "invalid_model")
    assert shown["status"] == "failed"
    device = api.client.get("/api/v1/devices/ok-1").json()
    assert (device["active_model_version"], device["update_phase"]) == ("1.0", "active")


def test_deploying_unknown_model_or_version_is_404(api: Api, digits_model_bytes: bytes) -> None:
    api.report("d1")
    body = {"model": "ghost", "version": "1.0", "target": {"device_ids": ["d1"]}}
    assert api.client.post("/api/v1/deployments", json=body, headers=api.auth).status_code == 404
    api.push("digits", "1.0", digits_model_bytes)
    body = {"model": "digits", "version": "2.0", "target": {"device_ids": ["d1"]}}
    response = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
    assert response.status_code == 404 and "no version '2.0'" in response.json()["detail"]


def test_selector_matching_no_device_is_422_naming_the_selector(api: Api, digits_model_bytes: bytes) -> None:
    api.push("digits", "1.0", digits_model_bytes)
    api.report("d1", tags={"site": "lab"})
    body = {"model": "digits", "version": "1.0", "target": {"tags": {"site": "mars"}}}
    response = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
    assert response.status_code == 422
    assert response.json()["detail"] == "no device matches tags site=mars"
    assert response.json()["field"] == "target.tags"
    body = {"model": "digits", "version": "1.0", "target": {"device_ids": ["d1", "ghost"]}}
    response = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
    assert response.status_code == 422 and "ghost" in response.json()["detail"]
    assert api.client.get("/api/v1/deployments").json()["count"] == 0, "a refused deployment left a record"


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"version": "1.0", "target": {"device_ids": ["d1"]}}, "body.model"),
        ({"model": "digits", "version": "1.0"}, "body.target"),
        ({"model": "digits", "version": "1.0", "target": {}}, "body.target"),
        ({"model": "digits", "version": "1.0", "target": {"device_ids": ["d1"], "tags": {"a": "b"}}}, "body.target"),
        ({"model": "digits", "version": "1.0", "target": {"device_ids": ["bad/id"]}}, "body.target.device_ids.0"),
        ({"model": "di gits", "version": "1.0", "target": {"device_ids": ["d1"]}}, "body.model"),
    ],
)
def test_malformed_deployment_body_is_422_naming_the_field(api: Api, body: dict[str, object], field: str) -> None:
    response = api.client.post("/api/v1/deployments", json=body, headers=api.auth)
    assert response.status_code == 422
    problem = response.json()
    assert problem["field"] == field
    assert field in problem["detail"]


def test_malformed_upload_fields_are_422_naming_the_field(api: Api, digits_model_bytes: bytes) -> None:
    def push(**data: str) -> dict[str, object]:
        files = {"file": ("m.onnx", digits_model_bytes)}
        response = api.client.post("/api/v1/models/digits/versions", data=data, files=files, headers=api.auth)
        assert response.status_code == 422, response.text
        return dict(response.json())

    assert push()["field"] == "body.version"
    assert push(version="1.0", inputs="[{")["field"] == "inputs"
    assert push(version="1.0", inputs='[{"name": "x", "datatype": "FP99", "shape": [1]}]')["field"] == "inputs"
    assert push(version="1.0", format="pickle")["field"] == "body.format"
    assert push(version="../etc")["field"] == "body.version"
    response = api.client.post("/api/v1/models/digits/versions", data={"version": "1"}, headers=api.auth)
    assert response.status_code == 422 and response.json()["field"] == "body.file"


def test_fleet_summary_and_health(api: Api) -> None:
    api.report("d1")
    summary = api.client.get("/api/v1/fleet/summary").json()
    assert summary["device_count"] == 1 and summary["devices"][0]["device_id"] == "d1"
    health = api.client.get("/healthz")
    assert health.status_code == 200 and health.json()["checks"]["database"] == "ok"
    assert "/api/v1/deployments" in api.client.get("/openapi.json").json()["paths"]
