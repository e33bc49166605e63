"""Every CLI command, given bad input, says what is wrong in one line and exits non-zero: never a traceback.

The `edgefleet` command tree is walked (plugins included: `compress`, `sim`, `demo`), so a command added later is
covered without touching this file. Bad input of three kinds: a coordinator that does not answer, paths that
cannot be made or read, and — against a real coordinator — a wrong token and ids that do not exist.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from typer.main import get_command
from typer.testing import CliRunner

from cloud.cli import build_app
from tests.services import free_port

APP = build_app()
BIN = Path(sys.executable).parent
# Commands that run until stopped get bad input of their own (below), in a process of their own.
LONG_RUNNING = {("up",), ("demo",), ("sim",)}


def leaves(command: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], Any]]:
    if hasattr(command, "commands"):
        for name, sub in sorted(command.commands.items()):
            yield from leaves(sub, (*path, name))
    else:
        yield path, command


COMMANDS = [(path, command) for path, command in leaves(get_command(APP)) if path not in LONG_RUNNING]


def options_of(command: Any) -> set[str]:
    return {opt for param in command.params for opt in getattr(param, "opts", [])}


def bad_invocation(path: tuple[str, ...], command: Any, url: str, unusable: str, ids: str) -> list[str]:
    """`path` with every required argument `ids`, required options `unusable`, `--url`, `--data-dir`, `--yes`."""
    args = list(path)
    for param in command.params:
        if param.required and param.param_type_name == "argument":
            args.append(ids)
    for param in command.params:
        if param.required and param.param_type_name == "option":
            args += [param.opts[0], unusable]
    opts = options_of(command)
    args += ["--url", url] if "--url" in opts else []
    args += ["--data-dir", unusable] if "--data-dir" in opts else []
    args += ["--yes"] if "--yes" in opts else []
    return args


def assert_one_line_error(args: list[str], exit_code: int, output: str, exception: BaseException | None) -> None:
    where = f"edgefleet {' '.join(args)}"
    assert exception is None or isinstance(exception, SystemExit), f"{where} raised {exception!r}"
    assert exit_code != 0, f"{where} succeeded on bad input:\n{output}"
    assert "Traceback" not in output, f"{where} printed a traceback:\n{output}"
    lines = [line for line in output.splitlines() if line.strip()]
    if exit_code == 2 and ("Usage:" in output or "Try '" in output):  # a usage error: click's own, naming the value
        assert any(word in output for word in ("Invalid value", "Missing", "No such", "Error")), output
        return
    errors = [line for line in lines if line.startswith(("error:", "Error:", "Aborted"))]
    assert len(errors) == 1, f"{where}: expected one error line, got:\n{output}"


def invoke(args: list[str], token: str = "eft_wrong") -> tuple[int, str, BaseException | None]:
    env = {"EDGEFLEET_TOKEN": token, "EDGEFLEET_CONFIG": "/nonexistent/edgefleet.toml", "COLUMNS": "200"}
    result = CliRunner().invoke(APP, args, env=env)
    return result.exit_code, result.output, result.exception


@pytest.fixture
def unusable(tmp_path: Path) -> str:
    """A path that can be neither created nor read: it lies under a regular file."""
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    return str(blocker / "sub")


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=[" ".join(p) for p, _ in COMMANDS])
def test_command_with_an_unreachable_coordinator_or_unusable_paths_fails_in_one_line(
    path: tuple[str, ...], command: Any, unusable: str
) -> None:
    args = bad_invocation(path, command, f"http://127.0.0.1:{free_port()}", unusable, "no-such-thing")
    assert_one_line_error(args, *invoke(args))


HTTP_COMMANDS = [(path, command) for path, command in COMMANDS if "--url" in options_of(command)]


@pytest.mark.parametrize(("path", "command"), HTTP_COMMANDS, ids=[" ".join(p) for p, _ in HTTP_COMMANDS])
def test_command_with_a_wrong_token_or_unknown_ids_fails_in_one_line(
    path: tuple[str, ...], command: Any, unusable: str, cli_coordinator: tuple[str, str]
) -> None:
    url, token = cli_coordinator
    wrong_token = bad_invocation(path, command, url, unusable, "nosuch:1")
    assert_one_line_error(wrong_token, *invoke(wrong_token))
    # Names where names are taken, numbers where ids are; each test its own (another one may create its name).
    own = zlib.crc32(" ".join(path).encode()) % 1_000_000
    for ids in (f"nosuch{own}:1", str(4_000_000 + own)):
        unknown = bad_invocation(path, command, url, unusable, ids)
        code, output, exception = invoke(unknown, token)
        if path == ("tokens", "create") or (code == 0 and not command_needs_an_existing_thing(path)):
            continue  # creating something under a new name is no error
        assert_one_line_error(unknown, code, output, exception)


def command_needs_an_existing_thing(path: tuple[str, ...]) -> bool:
    """Commands that act on something named: an unknown name is an error. Listings and creations are not."""
    return any(p in path for p in ("show", "events", "revoke", "decommission", "delete", "card", "history"))


@pytest.mark.parametrize(
    "args",
    [
        ["up", "--data-dir", "{unusable}", "--port", "0"],
        ["up", "--database-url", "nope://x", "--data-dir", "{tmp}/up", "--port", "0"],
        ["demo", "--data-dir", "{unusable}"],
        ["sim", "--coordinator", "http://127.0.0.1:{closed}", "--devices", "1", "--duration", "1", "--token", "t"],
    ],
    ids=["up-unusable-data-dir", "up-unknown-database", "demo-unusable-data-dir", "sim-unreachable"],
)
def test_long_running_command_with_bad_input_fails_in_one_line(args: list[str], unusable: str, tmp_path: Path) -> None:
    filled = [a.format(unusable=unusable, tmp=tmp_path, closed=free_port()) for a in args]
    done = subprocess.run(
        [str(BIN / "edgefleet"), *filled],
        capture_output=True,
        text=True,
        timeout=120,
        stdin=subprocess.DEVNULL,
        env={**os.environ, "EDGEFLEET_CONFIG": str(tmp_path / "none.toml"), "COLUMNS": "200"},
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert [line for line in done.stderr.splitlines() if line.startswith("error:")], done.stderr


ENROL = ["enroll", "--coordinator", "http://127.0.0.1:{closed}", "--device-id", "d1", "--token", "t", "--data-dir"]


@pytest.mark.parametrize(
    "args",
    [["run", "--config", "{tmp}/missing.toml"], [*ENROL, "{tmp}/a"], [*ENROL, "{unusable}"]],
    ids=["run-missing-config", "enroll-unreachable", "enroll-unusable-data-dir"],
)
def test_agent_command_with_bad_input_fails_in_one_line(args: list[str], unusable: str, tmp_path: Path) -> None:
    filled = [a.format(unusable=unusable, tmp=tmp_path, closed=free_port()) for a in args]
    done = subprocess.run(
        [str(BIN / "edgefleet-agent"), *filled], capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL
    )
    assert done.returncode != 0 and "Traceback" not in done.stderr, done.stderr
    assert len([line for line in done.stderr.splitlines() if line.strip()]) == 1, done.stderr
