"""Every listing's `--json` has one shape, `{"data": [...], "count": N}`, so that scripts read them alike.

The `edgefleet` command tree is walked: a listing added later is covered without touching this file.
"""

from __future__ import annotations

import json

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cloud.cli import build_app
from tests.test_cli_errors import APP, leaves, options_of

LISTINGS = [
    (path, command)
    for path, command in leaves(get_command(APP))
    # Listings of the whole fleet; `models alias list NAME` lists one model's, tested with aliases.
    if path[-1] == "list" and "--json" in options_of(command) and not any(p.required for p in command.params)
]


def test_every_listing_is_found() -> None:
    names = {" ".join(path) for path, _ in LISTINGS}
    assert {"devices list", "models list", "deployments list", "rollouts list", "tokens list"} <= names, names


@pytest.mark.parametrize(("path", "command"), LISTINGS, ids=[" ".join(p) for p, _ in LISTINGS])
def test_listing_json_is_data_and_count(
    path: tuple[str, ...], command: object, cli_coordinator: tuple[str, str]
) -> None:
    url, token = cli_coordinator
    env = {"EDGEFLEET_TOKEN": token, "EDGEFLEET_CONFIG": "/nonexistent/edgefleet.toml"}
    result = CliRunner().invoke(build_app(), [*path, "--json", "--url", url], env=env)
    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    assert isinstance(body, dict) and isinstance(body["data"], list) and body["count"] == len(body["data"]), body
