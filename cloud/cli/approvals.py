"""`edgefleet approvals ...`: high-risk model versions waiting for their card, their approvers or their signature."""

from __future__ import annotations

import typer

from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, table

__all__ = ["approvals_app"]

approvals_app = typer.Typer(help="What high-risk model versions need before they deploy.", no_args_is_help=True)


@approvals_app.command("list")
def approvals_list(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """List high-risk versions not signed yet: approvals given and needed, who could still approve, and why."""
    with api_errors():
        data = connect(url, token).approvals()
    rows = [
        (
            f"{s['name']}:{s['version']}",
            s["signing_state"],
            f"{len(s['signed_by'])}/{s['required']}",
            ", ".join(s["signed_by"]) or None,
            ", ".join(s["missing"]) or None,
            s.get("reason"),
        )
        for s in data
    ]
    columns = ["model", "signing", "approvals", "signed by", "not yet", "why not deployable"]
    emit({"data": data, "count": len(data)}, as_json, lambda _: table("approvals", columns, rows))
