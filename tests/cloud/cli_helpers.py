"""`edgefleet ...` run in-process against a test coordinator app: the CLI's own client, sent through a TestClient."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
from typer.testing import CliRunner

import cloud.cli as cli
from cloud.client import ApiClient
from tests.cloud.conftest import Api

# Every CLI module that talks to a coordinator through `connect`.
CLI_MODULES = (
    cli.models, cli.aliases, cli.devices, cli.deployments, cli.rollouts, cli.approvals, cli.fleet, cli.alerts,
    cli.drift, cli.ct,
)  # fmt: skip


def in_process_cli(api: Api, monkeypatch: pytest.MonkeyPatch, token: str | None = None) -> Callable[..., Any]:
    """A function running `edgefleet ARGS...` against `api`'s app as `token` (default: the admin token)."""
    client = ApiClient("http://testserver", token=token or api.coordinator.admin_token, send=api.anonymous.request)
    for module in CLI_MODULES:
        monkeypatch.setattr(module, "connect", lambda *_args, **_kwargs: client)

    def run(*args: str, input: str | None = None, columns: int = 300) -> Any:
        env = {"COLUMNS": str(columns)}
        return CliRunner().invoke(cli.build_app(load_plugins=False), list(args), env=env, input=input)

    return run


def ok_json(result: Any) -> Any:
    """The JSON a successful command printed; fails the test with its output otherwise."""
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)
