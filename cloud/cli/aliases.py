"""`edgefleet models alias ...`: movable names of a model's versions (`digits@production`) and their history.

`edgefleet deploy digits@production` and `edgefleet rollouts create digits@production` resolve the alias when
they are created and record the version it pointed at; moving the alias later redeploys nothing.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, table

__all__ = ["alias_app"]

alias_app = typer.Typer(
    help="Aliases of a model (production, staging, ...): set, move, list, delete, and who moved them when.",
    no_args_is_help=True,
)

NameArg = Annotated[str, typer.Argument(metavar="NAME", help="Model name, e.g. digits.")]
AliasArg = Annotated[str, typer.Argument(metavar="ALIAS", help="Alias name, e.g. production.")]


@alias_app.command("set")
def alias_set(
    name: NameArg,
    alias: AliasArg,
    version: Annotated[str, typer.Argument(metavar="VERSION", help="The version it is to point at, e.g. 1.2.0.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Point NAME@ALIAS at VERSION (creates the alias, or moves it; what runs is not redeployed)."""
    with api_errors():
        body = connect(url, token).set_alias(name, alias, version)
    emit(body, as_json, lambda b: f"{b['model']}@{b['alias']} -> {b['version']}")


@alias_app.command("list")
def alias_list(name: NameArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List the aliases of NAME and the versions they point at."""
    with api_errors():
        data = connect(url, token).aliases(name)
    body = {"data": data, "count": len(data)}
    rows = [(a["alias"], a["version"], a["updated_by"], a["updated_at"]) for a in data]
    emit(body, as_json, lambda _: table(f"aliases of {name}", ["alias", "version", "set by", "at"], rows))


@alias_app.command("history")
def alias_history(
    name: NameArg,
    alias: Annotated[str | None, typer.Option("--alias", help="Only this alias.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Who set, moved or deleted the aliases of NAME, when, and from which version to which (oldest first)."""
    with api_errors():
        data = connect(url, token).alias_history(name, alias)
    body = {"data": data, "count": len(data)}
    rows = [(c["changed_at"], c["alias"], c["from_version"], c["to_version"], c["changed_by"]) for c in data]
    columns = ["at", "alias", "from", "to", "by"]
    emit(body, as_json, lambda _: table(f"alias history of {name}", columns, rows))


@alias_app.command("delete")
def alias_delete(
    name: NameArg, alias: AliasArg, url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False
) -> None:
    """Remove NAME@ALIAS (its versions stay; the deletion is kept in the history)."""
    with api_errors():
        body = connect(url, token).delete_alias(name, alias)
    emit(body, as_json, _deleted)


def _deleted(body: dict[str, Any]) -> str:
    return f"{body['model']}@{body['alias']} deleted (pointed at {body['from_version']})"
