"""`edgefleet tokens ...`: API tokens with one role each (admin only): create, list, revoke."""

from __future__ import annotations

from typing import Annotated

import typer

from cloud.auth import Role
from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, table

__all__ = ["tokens_app"]

tokens_app = typer.Typer(
    help="API tokens: viewer (read), publisher (push models), operator (deploy, rollouts, devices), "
    "approver (approve high-risk models), admin (everything).",
    no_args_is_help=True,
)


@tokens_app.command("create")
def tokens_create(
    name: Annotated[str, typer.Option("--name", "-n", help="Who or what uses the token, e.g. ci or alice.")],
    role: Annotated[Role, typer.Option("--role", "-r", help="What the token may do.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Create a token (its secret is printed once; store it now)."""
    with api_errors():
        answer = connect(url, token).post_json("/tokens", {"name": name, "role": role.value})
    emit(answer, as_json, lambda a: f"token {a['name']} ({a['role']}), shown once:\n  {a['token']}")


@tokens_app.command("list")
def tokens_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List tokens: names, roles, last use, revocation (never the secrets)."""
    with api_errors():
        body = connect(url, token).get("/tokens")
    rows = [(t["name"], t["role"], t["created_by"], t["last_used_at"], t["revoked_at"]) for t in body]
    listing = {"data": body, "count": len(body)}  # every listing's --json has this shape
    emit(listing, as_json, lambda _: table("tokens", ["name", "role", "created by", "last used", "revoked"], rows))


@tokens_app.command("revoke")
def tokens_revoke(
    name: Annotated[str, typer.Argument(help="The token's name.")],
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Revoke a token at once."""
    with api_errors():
        answer = connect(url, token).request("DELETE", f"/tokens/{name}")
    emit(answer, as_json, lambda a: f"token {a['name']} revoked")
