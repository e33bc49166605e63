"""The operator's CLI configuration: coordinator URL and admin token, from options, environment or file."""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CliConfig", "config_path", "read_config", "write_config_if_absent"]


def config_path() -> Path:
    """`$EDGEFLEET_CONFIG`, else `$XDG_CONFIG_HOME/edgefleet/config.toml`, else `~/.config/edgefleet/config.toml`."""
    if explicit := os.environ.get("EDGEFLEET_CONFIG"):
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "edgefleet" / "config.toml"


@dataclass(frozen=True)
class CliConfig:
    """Where the coordinator is and how to authenticate to it."""

    url: str | None = None
    token: str | None = None


def read_config(path: Path | None = None) -> CliConfig:
    """The config file's values; an absent file is an empty config, an unreadable one says why."""
    path = path or config_path()
    if not path.exists():
        return CliConfig()
    try:
        data = tomllib.loads(path.read_text())
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError(f"cannot read CLI config {path}: {exc}") from exc
    url, token = data.get("url"), data.get("token")
    return CliConfig(url=str(url) if url else None, token=str(token) if token else None)


def _toml_string(value: str) -> str:
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def write_config_if_absent(*, url: str, token: str, path: Path | None = None) -> Path | None:
    """Write url and token (mode 0600) unless the file exists; returns the path written, or None."""
    path = path or config_path()
    if path.exists():
        return None
    path.parent.mkdir(parents=True, exist_ok=True)
    body = f"# written by `edgefleet up`\nurl = {_toml_string(url)}\ntoken = {_toml_string(token)}\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as fh:
        fh.write(body)
    return path
