"""Options and output helpers shared by the CLI's commands."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Annotated, Any, NamedTuple, NoReturn

import typer
from rich.console import Console, RenderableType
from rich.table import Table

from cloud.client import ApiClient, ApiError, config_path, read_config

__all__ = [
    "JsonOpt",
    "ModelRef",
    "TokenOpt",
    "UrlOpt",
    "YesOpt",
    "api_errors",
    "connect",
    "counts",
    "emit",
    "fail",
    "parse_model_ref",
    "table",
]

UrlOpt = Annotated[
    str | None,
    typer.Option("--url", envvar="EDGEFLEET_URL", help="Coordinator URL (default: from the CLI config file)."),
]
TokenOpt = Annotated[
    str | None,
    typer.Option("--token", envvar="EDGEFLEET_TOKEN", help="API token (default: from the CLI config file)."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]
YesOpt = Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")]


class ModelRef(NamedTuple):
    """A model named on the command line: `NAME`, `NAME:VERSION` or `NAME@ALIAS`."""

    name: str
    version: str | None = None
    alias: str | None = None

    def __str__(self) -> str:
        return self.name + (f":{self.version}" if self.version else "") + (f"@{self.alias}" if self.alias else "")


def parse_model_ref(ref: str, *, bare: bool = False) -> ModelRef:
    """`digits:1.0` or `digits@production` (`digits` too when `bare`) → a `ModelRef`; `ValueError` says why not."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        if name and alias and ":" not in ref:
            return ModelRef(name, alias=alias)
    elif ":" in ref:
        name, _, version = ref.partition(":")
        if name and version:
            return ModelRef(name, version=version)
    elif ref and bare:
        return ModelRef(ref)
    forms = "NAME, NAME:VERSION or NAME@ALIAS" if bare else "NAME:VERSION or NAME@ALIAS"
    raise ValueError(f"model must be {forms} (e.g. digits:1.0, digits@production), got {ref!r}")


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


def table(title: str, columns: Sequence[str], rows: Sequence[Sequence[Any]], *, whole: Sequence[str] = ()) -> Table:
    """A rich table; `None` cells print as '-'. Cells of the `whole` columns (ids) are never wrapped nor cut:
    a narrow terminal squeezes the other columns instead."""
    cells = [["-" if cell is None else str(cell) for cell in row] for row in rows]
    out = Table(title=title, title_justify="left")
    for index, column in enumerate(columns):
        if column in whole:
            widest = max([len(column), *(len(row[index]) for row in cells)])
            out.add_column(column, no_wrap=True, min_width=widest)
        else:
            out.add_column(column)
    for row in cells:
        out.add_row(*row)
    return out


def counts(by_status: dict[str, int]) -> str:
    """`a=1 b=2` (sorted), or '-' when empty."""
    return " ".join(f"{k}={v}" for k, v in sorted(by_status.items())) or "-"
