"""The trainable form of a version: stored beside its variants, read back, shown, deleted with it, refused when it is
not a torch.export program, and written only by the roles that push models."""

from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import httpx
import pytest
from sqlmodel import Session

from cloud.auth import Role
from cloud.services.tokens import create_token
from protocol.manifest import ManifestVariant, VariantsManifest, write_manifest
from protocol.messages import ModelFormat, TensorSpec
from tests.cloud.cli_helpers import in_process_cli, ok_json
from tests.cloud.conftest import Api

INPUTS = '[{"name": "x", "datatype": "FP32", "shape": [-1, 4]}]'


def pt2(seed: str = "a") -> bytes:
    """A zip laid out like the archive `torch.export.save` writes (what the registry checks), without torch."""
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:  # fixed timestamps: the same seed gives the same bytes
        for name, data in (
            ("model/archive_format", b"pt2"),
            ("model/models/model.json", json.dumps({"seed": seed}).encode()),
            ("model/data/weights/weight_0", seed.encode() * 64),
        ):
            archive.writestr(zipfile.ZipInfo(name, date_time=(2026, 1, 1, 0, 0, 0)), data)
    return out.getvalue()


def push(api: Api, name: str = "m", version: str = "1.0", content: bytes = b"model-bytes") -> None:
    api.push(name, version, content, format="tflite", inputs=INPUTS)


def put_trainable(
    api: Api, body: bytes, *, path: str = "/api/v1/models/m/versions/1.0/trainable", **headers: str
) -> httpx.Response:
    return api.client.put(path, content=body, headers={"Content-Type": "application/octet-stream", **headers})


def test_trainable_form_is_stored_content_addressed_and_read_back(api: Api) -> None:
    push(api)
    program = pt2()
    stored = put_trainable(api, program)
    assert stored.status_code == 200, stored.text
    form = stored.json()["trainable"]
    assert form["format"] == "torch.export" and form["size"] == len(program)
    assert api.coordinator.store.path(form["sha256"]).read_bytes() == program
    assert api.client.get("/api/v1/models/m/versions/1.0").json()["trainable"] == form
    assert api.client.get("/api/v1/models/m").json()["versions"][0]["trainable"] == form
    fetched = api.client.get("/api/v1/models/m/versions/1.0/trainable")
    assert fetched.status_code == 200 and fetched.content == program
    assert fetched.headers["content-type"] == "application/octet-stream"


def test_the_same_trainable_form_again_is_accepted_and_another_refused(api: Api) -> None:
    push(api)
    assert put_trainable(api, pt2("a")).status_code == 200
    assert put_trainable(api, pt2("a")).status_code == 200
    other = put_trainable(api, pt2("b"))
    assert other.status_code == 409
    assert "versions are immutable" in other.json()["detail"]
    sha_b = hashlib.sha256(pt2("b")).hexdigest()
    assert not api.coordinator.store.exists(sha_b), "the refused bytes are not kept"


@pytest.mark.parametrize(
    "body, why",
    [
        (b"definitely not a zip", "not a torch.export program"),
        (b"", "empty"),
    ],
)
def test_a_body_that_is_not_a_pt2_archive_is_refused_and_not_kept(api: Api, body: bytes, why: str) -> None:
    push(api)
    refused = put_trainable(api, body)
    assert refused.status_code == 422 and why in refused.json()["detail"]
    assert api.client.get("/api/v1/models/m/versions/1.0").json()["trainable"] is None
    assert not api.coordinator.store.exists(hashlib.sha256(body).hexdigest())


def test_a_zip_that_is_no_torch_export_program_is_refused(api: Api) -> None:
    push(api)
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        archive.writestr("readme.txt", "hello")
    refused = put_trainable(api, out.getvalue())
    assert refused.status_code == 422
    assert "zip archive but not a torch.export program" in refused.json()["detail"]


def test_unknown_version_and_missing_form_are_404(api: Api) -> None:
    assert put_trainable(api, pt2()).status_code == 404
    push(api)
    missing = api.client.get("/api/v1/models/m/versions/1.0/trainable")
    assert missing.status_code == 404
    assert "push one with `edgefleet models push --trainable`" in missing.json()["detail"]


def test_publishers_set_it_and_every_role_reads_it(api: Api) -> None:
    push(api)
    with Session(api.coordinator.engine) as session:
        tokens = {role: create_token(session=session, name=f"t-{role}", role=role, created_by="t")[0] for role in Role}
    for role in (Role.VIEWER, Role.OPERATOR, Role.APPROVER):
        refused = put_trainable(api, pt2(), Authorization=f"Bearer {tokens[role]}")
        assert refused.status_code == 403, role
    assert put_trainable(api, pt2(), Authorization=f"Bearer {tokens[Role.PUBLISHER]}").status_code == 200
    for role in Role:
        got = api.anonymous.get(
            "/api/v1/models/m/versions/1.0/trainable", headers={"Authorization": f"Bearer {tokens[role]}"}
        )
        assert got.status_code == 200, role
    assert api.anonymous.get("/api/v1/models/m/versions/1.0/trainable").status_code == 401


def test_deleting_the_version_removes_its_unshared_trainable_form(api: Api) -> None:
    push(api, version="1.0", content=b"one")
    push(api, version="2.0", content=b"two")
    shared = pt2("shared")
    assert put_trainable(api, shared).status_code == 200
    assert put_trainable(api, shared, path="/api/v1/models/m/versions/2.0/trainable").status_code == 200
    push(api, version="3.0", content=b"three")
    own = pt2("own")
    assert put_trainable(api, own, path="/api/v1/models/m/versions/3.0/trainable").status_code == 200
    sha = {name: hashlib.sha256(body).hexdigest() for name, body in (("shared", shared), ("own", own))}

    deleted = api.client.delete("/api/v1/models/m/versions/3.0").json()
    assert sha["own"] in deleted["removed_artifacts"]
    assert not api.coordinator.store.exists(sha["own"])
    deleted = api.client.delete("/api/v1/models/m/versions/1.0").json()
    assert sha["shared"] in deleted["kept_artifacts"], "2.0 still has it"
    assert api.coordinator.store.exists(sha["shared"])


def test_models_push_trainable_show_and_attach_later(api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    edgefleet = in_process_cli(api, monkeypatch)
    model, program = tmp_path / "m.tflite", tmp_path / "m.pt2"
    model.write_bytes(b"tflite-bytes")
    program.write_bytes(pt2())
    pushed = edgefleet(
        "models", "push", str(model), "--name", "m", "--version", "1.0", "--format", "tflite",
        "--inputs", INPUTS, "--trainable", str(program),
    )  # fmt: skip
    assert pushed.exit_code == 0, pushed.output
    assert f"trainable form {len(pt2())} B" in pushed.stdout
    shown = edgefleet("models", "show", "m:1.0")
    assert shown.exit_code == 0, shown.output
    assert f"trainable: torch.export, {len(pt2())} B, sha256=" in shown.stdout
    assert "trainable" in edgefleet("models", "show", "m").stdout

    edgefleet("models", "push", str(model), "--name", "m", "--version", "2.0", "--format", "tflite", "--inputs", INPUTS)
    assert "trainable: none" in edgefleet("models", "show", "m:2.0").stdout
    attached = ok_json(
        edgefleet("models", "push", "--name", "m", "--version", "2.0", "--trainable", str(program), "--json")
    )
    assert attached["trainable"]["size"] == len(pt2())


def test_models_push_variants_uploads_the_trainable_pt2_beside_them(
    api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    spec = TensorSpec.model_validate(json.loads(INPUTS)[0])
    content = b"fp32 model"
    (tmp_path / "fp32.onnx").write_bytes(content)
    entry = ManifestVariant(
        name="fp32",
        file="fp32.onnx",
        format=ModelFormat.ONNX,
        precision="fp32",
        inputs=[spec],
        sha256=hashlib.sha256(content).hexdigest(),
        size=len(content),
    )
    write_manifest(tmp_path, VariantsManifest(max_drop_pp=1.0, variants=[entry]))
    (tmp_path / "trainable.pt2").write_bytes(pt2())
    edgefleet = in_process_cli(api, monkeypatch)
    pushed = ok_json(
        edgefleet("models", "push", "--name", "m", "--version", "1.0", "--variants", str(tmp_path), "--json")
    )
    assert pushed["trainable"]["sha256"] == hashlib.sha256(pt2()).hexdigest()


def test_models_push_refuses_a_trainable_file_that_is_not_a_zip(
    api: Api, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    edgefleet = in_process_cli(api, monkeypatch)
    model, program = tmp_path / "m.tflite", tmp_path / "m.pt2"
    model.write_bytes(b"tflite-bytes")
    program.write_bytes(b"not a zip")
    refused = edgefleet(
        "models", "push", str(model), "--name", "m", "--version", "1.0", "--format", "tflite",
        "--inputs", INPUTS, "--trainable", str(program),
    )  # fmt: skip
    assert refused.exit_code == 1
    assert "not a torch.export program" in refused.stderr
    assert api.client.get("/api/v1/models/m/versions/1.0").status_code == 404, "nothing was uploaded"
