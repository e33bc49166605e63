"""`edgefleet up` as a real process, and the operator commands against it."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from importlib.metadata import EntryPoint
from pathlib import Path
from typing import Any

import httpx
import pytest
import typer
from typer.testing import CliRunner

import cloud.cli as cli
from agent.identity import enrol
from protocol.codec import encode
from protocol.messages import ReportedState
from protocol.topics import DEFAULT_BASE, Topics
from tests.e2e.clients import device_tls, mqtt_session

EDGEFLEET = Path(sys.executable).parent / "edgefleet"


@dataclass
class Running:
    proc: subprocess.Popen[bytes]
    data_dir: Path
    config: Path
    url: str
    mqtt_url: str
    stdout: Path

    @property
    def token(self) -> str:
        return (self.data_dir / "admin-token").read_text().strip()


@pytest.fixture
def coordinator(tmp_path: Path) -> Iterator[Running]:
    """`edgefleet up --port 0` with a temp data dir and its own CLI config path."""
    data_dir, config, out = tmp_path / "data", tmp_path / "cli" / "config.toml", tmp_path / "up.out"
    env = dict(os.environ, EDGEFLEET_CONFIG=str(config))
    env.pop("EDGEFLEET_URL", None)
    env.pop("EDGEFLEET_TOKEN", None)
    with out.open("wb") as sink:
        proc = subprocess.Popen(
            [str(EDGEFLEET), "up", "--data-dir", str(data_dir), "--port", "0"],
            stdout=sink,
            stderr=subprocess.STDOUT,
            env=env,
        )
    info_file = data_dir / "coordinator.json"
    deadline = time.monotonic() + 30
    while not info_file.exists():
        assert proc.poll() is None, f"edgefleet up exited: {out.read_text()}"
        assert time.monotonic() < deadline, f"no coordinator.json after 30s: {out.read_text()}"
        time.sleep(0.05)
    info = json.loads(info_file.read_text())
    assert info["pid"] == proc.pid
    running = Running(proc, data_dir, config, info["url"], info["mqtt_url"], out)
    try:
        yield running
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_up_serves_creates_token_and_exits_cleanly_on_sigterm(coordinator: Running) -> None:
    health = httpx.get(f"{coordinator.url}/healthz", timeout=5)
    assert health.status_code == 200, health.text
    token_file = coordinator.data_dir / "admin-token"
    assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    config = coordinator.config.read_text()
    assert coordinator.url in config and coordinator.token in config
    assert httpx.get(f"{coordinator.url}/api/v1/info", timeout=5).status_code == 401, "reads need a token"
    auth = {"Authorization": f"Bearer {coordinator.token}"}
    info = httpx.get(f"{coordinator.url}/api/v1/info", headers=auth, timeout=5).json()
    assert info["mqtt_url"] == coordinator.mqtt_url and info["topic_base"] == DEFAULT_BASE
    assert info["mqtt_url"].startswith("mqtts://"), "the embedded broker listens with TLS"
    assert stat.S_IMODE(coordinator.data_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((coordinator.data_dir / "coordinator.json").stat().st_mode) == 0o600
    assert stat.S_IMODE((coordinator.data_dir / "pki" / "ca.key").stat().st_mode) == 0o600

    started = time.monotonic()
    coordinator.proc.send_signal(signal.SIGTERM)
    assert coordinator.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    printed = coordinator.stdout.read_text()
    assert coordinator.url in printed and coordinator.mqtt_url in printed and coordinator.token in printed
    assert not (coordinator.data_dir / "coordinator.json").exists()


def run(*args: str, env: dict[str, str] | None = None) -> Any:
    result = CliRunner().invoke(cli.build_app(load_plugins=False), list(args), env=env)
    return result


def test_cli_pushes_deploys_and_lists_against_a_live_coordinator(coordinator: Running, digits_model_path: Path) -> None:
    env = {"EDGEFLEET_CONFIG": str(coordinator.config), "EDGEFLEET_URL": "", "EDGEFLEET_TOKEN": ""}
    pushed = run("models", "push", str(digits_model_path), "--name", "digits", "--version", "1.0", "--json", env=env)
    assert pushed.exit_code == 0, pushed.output
    assert json.loads(pushed.stdout)["inputs"][0]["shape"] == [-1, 64]

    listed = run("models", "list", "--json", env=env)
    assert [v["version"] for v in json.loads(listed.stdout)["data"][0]["versions"]] == ["1.0"]
    assert "digits" in run("models", "list", env=env).stdout

    enrolled = run("devices", "enroll", "cam-9", "--tag", "site=lab", "--json", env=env)
    assert enrolled.exit_code == 0, enrolled.output
    ticket = json.loads(enrolled.stdout)
    assert ticket["command"].startswith("edgefleet-agent enroll") and ticket["token"] in ticket["command"]
    identity = enrol(data_dir=coordinator.data_dir.parent / "cam-9", coordinator_url=coordinator.url,
                     device_id="cam-9", token=ticket["token"])  # fmt: skip
    state = ReportedState(device_id="cam-9", tags={"site": "elsewhere"})
    with mqtt_session(identity.broker_url, "cam-9", device_tls(identity)) as device:
        assert device.refused is None, device.refused
        device.client.publish(
            Topics(DEFAULT_BASE).reported("cam-9"), encode(state), qos=1, retain=True
        ).wait_for_publish(10)
    deadline = time.monotonic() + 10
    while json.loads(run("devices", "list", "--json", env=env).stdout)["data"][0]["status"] != "online":
        assert time.monotonic() < deadline, "device never came online"
        time.sleep(0.05)

    deployed = run("deploy", "digits:1.0", "--to", "site=lab", "--json", env=env)
    assert deployed.exit_code == 0, deployed.output
    deployment = json.loads(deployed.stdout)
    assert [t["device_id"] for t in deployment["targets"]] == ["cam-9"]
    shown = json.loads(run("deployments", "show", str(deployment["id"]), "--json", env=env).stdout)
    assert shown["targets"][0]["status"] == "pending"
    assert json.loads(run("deployments", "list", "--json", env=env).stdout)["count"] == 1
    summary = json.loads(run("fleet", "summary", "--json", env=env).stdout)
    assert summary["device_count"] == 1
    assert "cam-9" in run("deployments", "show", str(deployment["id"]), env=env).stdout
    assert "total" in run("fleet", "summary", env=env).stdout


def test_cli_shows_api_errors_as_one_line_and_fails(coordinator: Running, digits_model_path: Path) -> None:
    env = {"EDGEFLEET_CONFIG": str(coordinator.config), "EDGEFLEET_URL": "", "EDGEFLEET_TOKEN": ""}
    missing = run("deployments", "show", "999", env=env)
    assert missing.exit_code == 1
    assert "deployment 999 does not exist (HTTP 404)" in missing.output
    no_devices = run("deploy", "digits:1.0", "--to", "site=nowhere", env=env)
    assert no_devices.exit_code == 1 and "HTTP 404" in no_devices.output  # model not pushed yet
    wrong = run(
        "models",
        "push",
        str(digits_model_path),
        "--name",
        "d",
        "--version",
        "1",
        "--token",
        "nope",
        env={**env, "EDGEFLEET_URL": coordinator.url},
    )
    assert wrong.exit_code == 1 and "not a valid API token (unknown or revoked) (HTTP 401)" in wrong.output
    bad_target = run("deploy", "digits", "--to", "x", env=env)
    assert bad_target.exit_code == 1 and "NAME:VERSION" in bad_target.output


def test_cli_without_any_coordinator_url_says_how_to_get_one(tmp_path: Path) -> None:
    env = {"EDGEFLEET_CONFIG": str(tmp_path / "absent.toml"), "EDGEFLEET_URL": ""}
    result = run("devices", "list", env=env)
    assert result.exit_code == 1 and "no coordinator URL" in result.output


def test_unreachable_coordinator_is_one_clear_line(tmp_path: Path) -> None:
    result = run("models", "list", "--url", "http://127.0.0.1:9", env={"EDGEFLEET_CONFIG": str(tmp_path / "x")})
    assert result.exit_code == 1 and "cannot reach the coordinator at http://127.0.0.1:9" in result.output


def test_parse_targets_refuses_mixed_ids_and_tags() -> None:
    assert cli.deployments.parse_targets(["a", "b"]) == {"device_ids": ["a", "b"]}
    assert cli.deployments.parse_targets(["site=lab", "hw=pi"]) == {"tags": {"site": "lab", "hw": "pi"}}
    with pytest.raises(ValueError, match="mixes"):
        cli.deployments.parse_targets(["a", "site=lab"])


def _function_plugin(name: str = "world") -> None:
    """A plugin command given as a plain function."""
    print(f"hi {name}")


def test_broken_plugin_warns_and_leaves_the_cli_working(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    good = typer.Typer()

    @good.command()
    def hello() -> None:
        print("hello from plugin")

    entries = [
        EntryPoint("broken", "no_such_module_xyz:app", cli.PLUGIN_GROUP),
        EntryPoint("good", "tests.cloud.test_cli:_PLUGIN", cli.PLUGIN_GROUP),
        EntryPoint("fn", "tests.cloud.test_cli:_function_plugin", cli.PLUGIN_GROUP),
    ]
    monkeypatch.setattr(cli, "entry_points", lambda group: entries if group == cli.PLUGIN_GROUP else [])
    monkeypatch.setattr(sys.modules[__name__], "_PLUGIN", good, raising=False)
    app = cli.build_app()
    warnings = capsys.readouterr().err
    assert "plugin 'broken'" in warnings and "failed to load" in warnings
    result = CliRunner().invoke(app, ["good", "hello"])
    assert result.exit_code == 0, result.output
    assert "hello from plugin" in result.stdout
    assert CliRunner().invoke(app, ["fn", "--name", "fleet"]).stdout.strip() == "hi fleet"
    assert CliRunner().invoke(app, ["models", "--help"]).exit_code == 0


def test_coordinator_socket_disables_nagle_so_keep_alive_requests_do_not_wait_for_delayed_acks() -> None:
    """uvicorn on a pre-bound socket leaves Nagle on; each keep-alive API call then took 44 ms instead of 1 ms."""
    import socket

    from cloud.cli.up import _bind

    sock = _bind("127.0.0.1", 0)
    try:
        sock.listen()
        with socket.create_connection(sock.getsockname()):
            accepted, _ = sock.accept()
            with accepted:
                assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
    finally:
        sock.close()
