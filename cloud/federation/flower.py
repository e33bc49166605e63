"""The `flwr` control CLI of the Flower venv, behind a small typed interface (`FlowerControl`).

Flower 1.42 cannot share the coordinator's venv (typer/fastapi pins), so the coordinator never imports `flwr`: it runs
the CLI of `.venv-flower` as a subprocess with a timeout, in a Flower home of its own whose `config.toml` names one
connection (the SuperLink's address, and its CA or `insecure`), and reads the `--format json` answer. The CLI exits 0
for most failures and says `"success": false` instead; both are a `FlowerError` carrying Flower's own text and its
`[code: N]` when it gives one.

Errors (under `cloud.errors.TransientError`: the SuperLink may answer later)::

    FlowerError                 a `flwr` command failed; `code` is Flower's error code when it gave one
    └── FlowerUnavailableError  the Flower venv is missing or a command did not answer in time
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cloud.errors import TransientError

__all__ = [
    "CODE_KEY_IN_USE",
    "CODE_NODE_NOT_FOUND",
    "CONNECTION",
    "FlowerControl",
    "FlowerError",
    "FlowerRunStatus",
    "FlowerUnavailableError",
    "flower_bin_dir",
    "flower_env",
    "toml_value",
]

log = logging.getLogger(__name__)

CONNECTION = "edgefleet"  # the one connection in the control home's config.toml
CODE_KEY_IN_USE = 23  # "Public key already in use." (registered, or unregistered: Flower never takes a key twice)
CODE_NODE_NOT_FOUND = 24  # "Node ID not found for account." (unknown, or unregistered already)
_CODE = re.compile(r"\[code: (\d+)\]")
_SETTING = "flower_bin_dir (EDGEFLEET_FLOWER_BIN_DIR)"
# What a Flower process must not inherit from the coordinator: another venv's Python path would shadow flwr's pins.
_SCRUBBED = ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PYTHONSAFEPATH")


class FlowerError(TransientError):
    """A `flwr` command failed; the message says what was asked and Flower's own error text."""

    def __init__(self, message: str, *, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


class FlowerUnavailableError(FlowerError):
    """The Flower venv is not there, or a command did not answer within its timeout."""


@dataclass(frozen=True)
class FlowerRunStatus:
    """A Flower run's status as `flwr ls` reports it."""

    status: str  # pending|starting|running|finished:completed|finished:failed|finished:stopped
    details: str  # Flower's status-details ("" if none)

    @property
    def finished(self) -> bool:
        """True once the run ended (completed, failed or stopped)."""
        return self.status.startswith("finished")


def flower_bin_dir(configured: Path | None = None) -> Path:
    """The Flower venv's bin directory: `configured`, else `.venv-flower/bin` beside the running venv, else the
    directory of `flower-superlink` on PATH; `FlowerUnavailableError` naming the setting when there is none."""
    if configured is not None:
        directory = configured.expanduser()
        if not (directory / "flwr").exists():
            raise FlowerUnavailableError(f"{_SETTING} is {directory}, which holds no flwr; run `make flower`")
        return directory
    beside = Path(sys.prefix).parent / ".venv-flower" / "bin"
    if (beside / "flower-superlink").exists():
        return beside
    found = shutil.which("flower-superlink")
    if found:
        return Path(found).parent
    raise FlowerUnavailableError(
        f"no Flower venv found: not at {beside} and no flower-superlink on PATH; "
        f"run `make flower` (it builds .venv-flower) or set {_SETTING}"
    )


def flower_env(home: Path, bin_dir: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment of a Flower process: its own FLWR_HOME, no telemetry or update check, no runtime installs,
    the Flower venv first on PATH (the SuperLink starts `flower-superexec` by name), no foreign Python path."""
    env = {k: v for k, v in (os.environ if base is None else base).items() if k not in _SCRUBBED}
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION="1",
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)]),
        NO_COLOR="1",
        COLUMNS="200",
    )
    return env


def toml_value(value: str | int | float | bool) -> str:
    """`value` as a TOML literal (a run-config value): strings quoted and escaped, booleans lower case."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"run config value {value} is not a finite number")
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string (same escapes)
    raise TypeError(f"run config values are str, int, float or bool, not {type(value).__name__}")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


class FlowerControl:
    """Runs `flwr` of the Flower venv against one SuperLink: registers and unregisters SuperNodes, starts, watches
    and stops runs. Thread-safe (every call is its own process)."""

    def __init__(
        self,
        *,
        bin_dir: Path,
        home: Path,
        address: str,
        root_certificates: Path | None,
        timeout_s: float = 60.0,
        run_timeout_s: float = 300.0,
    ) -> None:
        """`root_certificates`: the CA that signed the SuperLink's certificate; None connects without TLS."""
        self.bin_dir = bin_dir
        self.home = home
        self.address = address
        self.root_certificates = root_certificates
        self.timeout_s = timeout_s
        self.run_timeout_s = run_timeout_s
        self._write_config()

    def _write_config(self) -> None:
        """`config.toml` of the control home: the one connection, default."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]"]
        lines.append(f"address = {toml_value(self.address)}")
        if self.root_certificates is None:
            lines.append("insecure = true")
        else:
            lines.append(f"root-certificates = {toml_value(str(self.root_certificates.resolve()))}")
        (self.home / "config.toml").write_text("\n".join(lines) + "\n")

    # -- the contract ------------------------------------------------------------------------------------------

    def register_node(self, public_key_openssh: str, *, name: str) -> str:
        """Register a SuperNode's public key (OpenSSH form); its node id (stable per key)."""
        with tempfile.TemporaryDirectory(prefix="flwr-key-") as tmp:
            key_file = Path(tmp) / "node.pub"
            key_file.write_text(public_key_openssh.strip() + "\n")
            body = self._call(["supernode", "register", str(key_file), CONNECTION, "--name", name], f"register {name}")
        return str(self._field(body, "node-id", f"register {name}"))

    def unregister_node(self, node_id: str) -> None:
        """Unregister a SuperNode: its key is refused from now on (for good: Flower never takes a key back)."""
        self._call(["supernode", "unregister", str(node_id), CONNECTION], f"unregister node {node_id}")

    def nodes(self) -> list[dict[str, Any]]:
        """The SuperNodes the SuperLink knows (`flwr supernode list`): node-id, status, created-at, ..."""
        body = self._call(["supernode", "list", CONNECTION], "list nodes")
        nodes = self._field(body, "nodes", "list nodes")
        return [dict(n) for n in nodes] if isinstance(nodes, list) else []

    def start_run(self, app_dir: Path, run_config: Mapping[str, str | int | float | bool]) -> int:
        """Start a run of the Flower App in `app_dir` with `run_config` overriding its defaults; the run id."""
        with tempfile.TemporaryDirectory(prefix="flwr-run-") as tmp:
            args = ["run", str(app_dir.resolve()), CONNECTION]
            if run_config:
                config_file = Path(tmp) / "run-config.toml"
                config_file.write_text("".join(f"{_toml_key(k)} = {toml_value(v)}\n" for k, v in run_config.items()))
                args += ["--run-config", str(config_file)]
            body = self._call(args, f"start a run of {app_dir.name}", timeout_s=self.run_timeout_s)
        return int(self._field(body, "run-id", "start a run"))

    def run_status(self, run_id: int) -> FlowerRunStatus:
        """The status of run `run_id` (`flwr ls --run-id`)."""
        body = self._call(["ls", CONNECTION, "--run-id", str(run_id)], f"status of run {run_id}")
        runs = self._field(body, "runs", f"status of run {run_id}")
        if not isinstance(runs, list) or not runs:
            raise FlowerError(f"status of run {run_id}: the SuperLink does not know this run")
        run = runs[0]
        details = str(run.get("status-details") or "")
        return FlowerRunStatus(status=str(run.get("status", "")), details="" if details == "N/A" else details)

    def stop_run(self, run_id: int) -> None:
        """Stop run `run_id`."""
        self._call(["stop", str(run_id), CONNECTION], f"stop run {run_id}")

    # -- beyond the contract ---------------------------------------------------------------------------------

    def ping(self, timeout_s: float | None = None) -> None:
        """Ask the SuperLink for its runs; `FlowerError` unless it answers (the readiness probe)."""
        self._call(["ls", CONNECTION, "--limit", "1"], "list runs", timeout_s=timeout_s)

    # -- the CLI ---------------------------------------------------------------------------------------------

    def _call(self, args: Sequence[str], what: str, *, timeout_s: float | None = None) -> dict[str, Any]:
        """Run `flwr ARGS --format json`; its JSON body, or `FlowerError` with Flower's own error text."""
        flwr = self.bin_dir / "flwr"
        command = [str(flwr), *args, "--format", "json"]
        timeout = self.timeout_s if timeout_s is None else timeout_s
        try:
            done = subprocess.run(
                command,
                env=flower_env(self.home, self.bin_dir),
                cwd=self.home,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except FileNotFoundError as exc:
            raise FlowerUnavailableError(f"{what}: {flwr} does not exist; run `make flower` or set {_SETTING}") from exc
        except subprocess.TimeoutExpired as exc:
            raise FlowerUnavailableError(f"{what}: flwr did not answer within {timeout:.0f}s") from exc
        except OSError as exc:
            raise FlowerUnavailableError(f"{what}: cannot run {flwr}: {exc}") from exc
        body = _json_body(done.stdout)
        if body is None:
            text = _clean(done.stderr or done.stdout) or f"exit code {done.returncode}, no output"
            raise FlowerError(f"{what} failed: {text}", code=_code(text))
        if not body.get("success", False):
            text = _clean(str(body.get("error-message", ""))) or "no error message"
            raise FlowerError(f"{what} failed: {text}", code=_code(text))
        return body

    @staticmethod
    def _field(body: Mapping[str, Any], key: str, what: str) -> Any:
        if key not in body or body[key] is None:
            raise FlowerError(f"{what}: flwr answered without {key!r}: {json.dumps(body)[:300]}")
        return body[key]


def _json_body(stdout: str) -> dict[str, Any] | None:
    """The JSON object `flwr --format json` printed (the last one, should anything else precede it)."""
    start = stdout.find("{")
    while start != -1:
        try:
            body = json.loads(stdout[start:])
        except ValueError:
            start = stdout.find("\n{", start + 1)
            start = start + 1 if start != -1 else -1
            continue
        return body if isinstance(body, dict) else None
    return None


def _clean(text: str) -> str:
    """Flower's error text on one line, without its 'Using SuperLink: ...' preamble and box drawing."""
    lines = [line.strip(" │╭╮╰╯─\t") for line in text.splitlines()]
    kept = [line for line in lines if line and not line.startswith("Using SuperLink:")]
    return " ".join(kept)[:1000]


def _code(text: str) -> int | None:
    match = _CODE.search(text)
    return int(match.group(1)) if match else None
