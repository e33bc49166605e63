"""Options and output helpers shared by the CLI's commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console, RenderableType
from rich.table import Table

from cloud.client import ApiClient, ApiError, config_path, read_config

__all__ = ["JsonOpt", "TokenOpt", "UrlOpt", "api_errors", "connect", "counts", "emit", "fail", "table"]

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="EDGEFLEET_URL", help="Coordinator URL (default: from the CLI config file)."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="API token (default: from the CLI config file)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def fail(message: str) -> NoReturn:
    """Print one error line to stderr and exit 1."""
    Console(stderr=True, highlight=False).print(f"[red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(1)


def connect(url: str | None, token: str | None) -> ApiClient:
    """A client from options/environment, falling back to the CLI config file."""
    try:
        config = read_config()
    except ValueError as exc:
        fail(str(exc))
    url = url or config.url
    if not url:
        fail(f"no coordinator URL: pass --url, set EDGEFLEET_URL, or run `edgefleet up` (writes {config_path()})")
    return ApiClient(url=url, token=token or config.token)


@contextmanager
def api_errors() -> Iterator[None]:
    """Turn an `ApiError` into one clear line and a non-zero exit."""
    try:
        yield
    except ApiError as exc:
        fail(str(exc))


def emit(data: Any, as_json: bool, render: Callable[[Any], RenderableType]) -> None:
    """Print `data` as JSON or through `render`."""
    if as_json:
        sys.stdout.write(json.dumps(data, indent=2, sort_keys=True) + "\n")
        return
    Console(highlight=False).print(render(data))


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> Table:
    """A rich table; `None` cells print as '-'."""
    out = Table(title=title, title_justify="left")
    for column in columns:
        out.add_column(column)
    for row in rows:
        out.add_row(*("-" if cell is None else str(cell) for cell in row))
    return out


def counts(by_status: dict[str, int]) -> str:
    """`a=1 b=2` (sorted), or '-' when empty."""
    return " ".join(f"{k}={v}" for k, v in sorted(by_status.items())) or "-"
