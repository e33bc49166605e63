"""`edgefleet audit ...`: the tamper-evident audit log: list entries, verify the chain, sign its head now."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.text import Text

from cloud.audit.chain import AuditReport
from cloud.cli._common import JsonOpt, TokenOpt, UrlOpt, api_errors, connect, emit, table

__all__ = ["audit_app"]

audit_app = typer.Typer(
    help="The audit log: who did what (tokens, enrolment, rollouts, models, keys, approvals), hash-chained "
    "and signed, so that an edited, reordered or deleted entry shows.",
    no_args_is_help=True,
)


@audit_app.command("list")
def audit_list(
    after: Annotated[int | None, typer.Option("--after", help="Entries after this seq (default: the newest).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="How many entries.")] = 100,
    actor: Annotated[str | None, typer.Option("--actor", help="Only this actor's entries.")] = None,
    action: Annotated[str | None, typer.Option("--action", help="Only this action, e.g. token.created.")] = None,
    url: UrlOpt = None,
    token: TokenOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """List audit entries, oldest first: seq, time, actor, action, subject, details."""
    params: dict[str, Any] = {"after_seq": after, "limit": limit, "actor": actor, "action": action}
    with api_errors():
        body = connect(url, token).get("/audit", **{k: v for k, v in params.items() if v is not None})
    rows = [
        (e["seq"], e["at"], escape(e["actor"]), e["action"], escape(e["subject"]), escape(_compact(e["details"])))
        for e in body["data"]
    ]
    title = f"audit log (head seq {body['head_seq']})"
    emit(body, as_json, lambda _: table(title, ["seq", "at", "actor", "action", "subject", "details"], rows))


def _compact(details: dict[str, Any]) -> str:
    return json.dumps(details, sort_keys=True, separators=(",", ":")) if details else ""


@audit_app.command("verify")
def audit_verify(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Recompute the chain, check the signed checkpoints and the head file; exit 1 on any problem."""
    with api_errors():
        report = connect(url, token).get("/audit/verify")
    emit(report, as_json, _render_report)
    if not report["ok"]:
        raise typer.Exit(1)


def _render_report(report: dict[str, Any]) -> Text:
    return Text(AuditReport.model_validate(report).summary())


@audit_app.command("checkpoint")
def audit_checkpoint(url: UrlOpt = None, token: TokenOpt = None, as_json: JsonOpt = False) -> None:
    """Sign the chain's head now with the coordinator's audit key (admin)."""
    with api_errors():
        answer = connect(url, token).post_json("/audit/checkpoint", {})
    emit(answer, as_json, lambda a: f"checkpoint at seq {a['seq']}: hash {a['hash'][:16]}…, key {a['keyid'][:16]}…")
