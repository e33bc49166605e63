"""Every route x every role: who may call what (the issue's table), found by walking the app, not listed by hand.

A route that is not public must refuse no token and a wrong token with 401 before doing anything, refuse
every role it does not admit with 403, and let the roles it admits through (whatever the answer then is:
a 404 for a made-up id is fine, a 401/403 is not). Public routes are the ones a device calls before it has
an identity. Bodies are refused before they are read when the token is missing or lacks the role.
"""

from __future__ import annotations

import re
from typing import Any

import pytest

from cloud.api import PUBLIC_ROUTES
from cloud.api.guard import api_routes, route_roles
from cloud.auth import Role
from cloud.services.tokens import create_token
from tests.cloud.conftest import Api

# What each role may do, as cloud/auth.py states it (admin may always).
READ = frozenset[Role]()  # any valid token
OPERATOR = frozenset({Role.OPERATOR})
PUBLISHER = frozenset({Role.PUBLISHER})
ADMIN = frozenset({Role.ADMIN})


def expected_roles(method: str, path: str) -> frozenset[Role] | None:
    """The roles the documented policy gives a route; None for a public route."""
    if (method, path) in PUBLIC_ROUTES or path in {"/api/v1/artifacts/{sha256}", "/api/v1/tuf/targets/{target:path}"}:
        return None  # artifacts and targets check a viewer token or a device's download token themselves
    if path.startswith("/api/v1/tokens") or path.startswith("/api/v1/bootstrap-secrets"):
        return ADMIN
    if (method, path) == ("POST", "/api/v1/audit/checkpoint"):
        return ADMIN  # signs the audit log's head with the coordinator's audit key
    if path.startswith("/api/v1/approvals/{name}/{version}"):
        return frozenset({Role.APPROVER})
    if method == "GET":
        return READ  # including model cards, `/api/v1/approvals` and a version's `.../approvals`
    if (method, path) == ("PUT", "/api/v1/models/{name}/versions/{version}/card"):
        return PUBLISHER  # a model card, and with it the version's risk class, is the publisher's word
    if path.startswith("/api/v1/models"):
        return PUBLISHER
    if path.startswith(
        ("/api/v1/deployments", "/api/v1/rollouts", "/api/v1/devices", "/api/v1/federated", "/api/v1/ct")
    ):
        return OPERATOR
    if path.startswith("/api/v1/alerts"):
        return OPERATOR  # acknowledging an alert
    raise AssertionError(f"no documented role for {method} {path}: add it to the policy and to this test")


def all_routes(api: Api) -> list[tuple[str, str, Any]]:
    routes = api_routes(api.client.app)  # type: ignore[attr-defined]
    assert len(routes) > 30, "the walk missed the included routers"
    return [(m, r.path, r) for r in routes for m in sorted(r.methods)]


def concrete(path: str) -> str:
    """A path with made-up values for its parameters."""
    values = {"name": "nomodel", "version": "9.9", "device_id": "nodevice", "rollout_id": "999999",
              "deployment_id": "999999", "sha256": "0" * 64}  # fmt: skip
    return re.sub(r"\{(\w+)\}", lambda m: values.get(m.group(1), "x"), path)


@pytest.fixture
def tokens(api: Api) -> dict[Role, str]:
    from sqlmodel import Session

    with Session(api.coordinator.engine) as session:
        return {
            role: create_token(session=session, name=f"t-{role.value}", role=role, created_by="test")[0]
            for role in Role
        }


def test_every_route_states_the_documented_roles(api: Api) -> None:
    mismatches = []
    for method, path, route in all_routes(api):
        if path in {"/openapi.json", "/docs", "/docs/oauth2-redirect", "/redoc"}:
            continue
        declared = route_roles(route)
        if expected_roles(method, path) is None:
            assert declared is None, f"{method} {path} is public but declares roles {declared}"
            continue
        if declared != expected_roles(method, path):
            mismatches.append(f"{method} {path}: declares {declared}, documented {expected_roles(method, path)}")
    assert not mismatches, "\n".join(mismatches)


@pytest.mark.parametrize("header", [None, "Bearer wrong-token", "Basic YWRtaW46YWRtaW4="])
def test_every_route_refuses_a_missing_or_wrong_token(api: Api, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    for method, path, _ in all_routes(api):
        if expected_roles(method, path) is None or path.startswith("/docs") or path in {"/openapi.json", "/redoc"}:
            continue
        response = api.anonymous.request(method, concrete(path), headers=headers, json={})
        assert response.status_code == 401, f"{method} {path} answered {response.status_code} without a valid token"
        assert response.headers["www-authenticate"] == "Bearer"
        assert "token" in response.json()["detail"]


def test_every_role_against_every_route(api: Api, tokens: dict[Role, str]) -> None:
    wrong = []
    for method, path, _ in all_routes(api):
        required = expected_roles(method, path)
        if required is None or path.startswith("/docs") or path in {"/openapi.json", "/redoc"}:
            continue
        for role, token in tokens.items():
            response = api.anonymous.request(
                method, concrete(path), headers={"Authorization": f"Bearer {token}"}, json={}
            )
            admitted = role is Role.ADMIN or not required or role in required
            refused = response.status_code in (401, 403)
            if admitted == refused:
                wrong.append(f"{role.value} {method} {path} -> {response.status_code}")
            if not admitted:
                assert response.status_code == 403, f"{role.value} {method} {path} -> {response.status_code}"
    assert not wrong, "\n".join(wrong)


def test_public_routes_need_no_token(api: Api) -> None:
    assert api.anonymous.get("/healthz").status_code in (200, 503)
    assert api.anonymous.get("/api/v1/pki/ca.pem").text.startswith("-----BEGIN CERTIFICATE-----")
    assert api.anonymous.get("/api/v1/pki/crl.pem").text.startswith("-----BEGIN X509 CRL-----")
    refused = api.anonymous.post("/api/v1/enrolment", json={"device_id": "d", "csr_pem": "x", "token": "nope"})
    assert refused.status_code in (401, 422)


def test_a_revoked_token_is_refused_at_once(api: Api, tokens: dict[Role, str]) -> None:
    viewer = {"Authorization": f"Bearer {tokens[Role.VIEWER]}"}
    assert api.anonymous.get("/api/v1/devices", headers=viewer).status_code == 200
    assert api.client.delete("/api/v1/tokens/t-viewer").status_code == 200
    assert api.anonymous.get("/api/v1/devices", headers=viewer).status_code == 401


def test_token_listing_never_shows_a_secret(api: Api, tokens: dict[Role, str]) -> None:
    listing = api.client.get("/api/v1/tokens").text
    assert all(secret not in listing for secret in tokens.values())
    assert "t-operator" in listing
