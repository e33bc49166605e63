"""The operator's everyday commands around the registry and the fleet: `--version`, `deployments show --watch`,
and the API docs pages served from the coordinator itself (they work on a network without internet)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import cloud.app
from cloud import __version__
from cloud.app import create_app
from cloud.settings import Settings
from tests.cloud.cards_helpers import INPUTS
from tests.cloud.cli_helpers import in_process_cli
from tests.cloud.conftest import Api

BIN = Path(sys.executable).parent


@pytest.mark.parametrize("program", ["edgefleet", "edgefleet-agent"])
def test_version_option_prints_the_version(program: str) -> None:
    done = subprocess.run([str(BIN / program), "--version"], capture_output=True, text=True, timeout=60, check=False)
    assert (done.returncode, done.stdout.strip()) == (0, f"{program} {__version__}"), done.stderr


def test_deployments_show_watch_follows_until_the_deployment_settles(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    edgefleet = in_process_cli(api, monkeypatch)
    pushed = api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    for device_id in ("cam-1", "cam-2"):
        api.report(device_id, tags={"site": "lab"})
    created = api.client.post(
        "/api/v1/deployments", json={"model": "digits", "version": "1.0", "target": {"tags": {"site": "lab"}}}
    ).json()
    model = {"name": "digits", "version": "1.0", "sha256": pushed["sha256"]}

    def devices_report() -> None:
        time.sleep(0.4)
        api.report("cam-1", update={"generation": 1, "phase": "downloading"})
        time.sleep(0.4)
        for device_id in ("cam-1", "cam-2"):
            api.report(device_id, active_model=model, update={"generation": 1, "phase": "active"})

    reporter = threading.Thread(target=devices_report)
    reporter.start()
    watched = edgefleet("deployments", "show", str(created["id"]), "--watch", "--json", "--interval", "0.05")
    reporter.join()
    assert watched.exit_code == 0, watched.output
    lines = [json.loads(line) for line in watched.stdout.splitlines()]
    assert lines[0] == {"id": created["id"], "status": "in_progress", "counts": {"pending": 2}}
    assert {"in_progress": 1, "pending": 1} in [line["counts"] for line in lines], "a change in between is shown"
    assert lines[-1] == {"id": created["id"], "status": "succeeded", "counts": {"succeeded": 2}}
    assert len(lines) == len({json.dumps(line, sort_keys=True) for line in lines}), "one line per change"

    live = edgefleet("deployments", "show", str(created["id"]), "--watch")
    assert live.exit_code == 0 and "cam-2" in live.stdout and "succeeded" in live.stdout


def test_deployments_show_watch_gives_up_after_its_timeout(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    edgefleet = in_process_cli(api, monkeypatch)
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    api.report("silent-1")
    deployment = api.client.post(
        "/api/v1/deployments", json={"model": "digits", "version": "1.0", "target": {"device_ids": ["silent-1"]}}
    ).json()
    for extra in ([], ["--json"]):
        stuck = edgefleet("deployments", "show", str(deployment["id"]), "--watch", "--timeout", "0.3", *extra)
        assert stuck.exit_code == 1
        assert f"deployment {deployment['id']} is still in_progress after 0.3s" in stuck.output


def test_deployments_show_watch_exits_1_when_a_device_failed(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    edgefleet = in_process_cli(api, monkeypatch)
    api.push("digits", "1.0", b"model bytes", inputs=INPUTS)
    api.report("cam-bad", tags={"site": "lab"})
    deployment = api.client.post(
        "/api/v1/deployments", json={"model": "digits", "version": "1.0", "target": {"device_ids": ["cam-bad"]}}
    ).json()
    error = {"code": "invalid_model", "message": "model takes inputs ['args_0'], the deployment declares ['input']"}
    api.report("cam-bad", update={"generation": 1, "phase": "failed", "error": error})
    for extra in ([], ["--json"]):  # a script waiting on the deployment learns that it failed
        watched = edgefleet("deployments", "show", str(deployment["id"]), "--watch", *extra)
        assert watched.exit_code == 1, watched.output
        assert f"deployment {deployment['id']} settled with 1 device(s) failed" in watched.output


def _local_references(html: str) -> list[str]:
    """Every URL the page loads or links to; fails on any that names a host."""
    references = re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html)
    assert not re.search(r"https?://", html), "the page names an external host"
    return references


def test_api_docs_load_every_asset_from_the_coordinator(api: Api) -> None:
    for page in ("/docs", "/redoc"):
        response = api.anonymous.get(page)
        assert response.status_code == 200 and "text/html" in response.headers["content-type"]
        references = _local_references(response.text)
        assert any(ref.endswith(".js") for ref in references), references
        for reference in references:
            asset = api.anonymous.get(reference)
            assert asset.status_code == 200 and asset.content, reference
        assert "/openapi.json" in response.text
    assert api.anonymous.get("/openapi.json").json()["info"]["title"] == "edgefleet coordinator"
    assert api.anonymous.get("/docs/oauth2-redirect").status_code == 200


def test_api_docs_without_their_assets_say_where_the_openapi_description_is(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cloud.app, "_docs_assets", lambda: None)
    settings = Settings(data_dir=tmp_path / "coordinator", database_url=f"sqlite:///{tmp_path / 'db.sqlite'}")
    with TestClient(create_app(settings, enable_mqtt=False)) as client:
        page = client.get("/docs")
    assert page.status_code == 200 and '<a href="/openapi.json">' in page.text
    _local_references(page.text)
