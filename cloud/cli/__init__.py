"""The operator CLI `edgefleet`: `up` runs the coordinator; the other commands talk to one over HTTP.

Subcommands from other packages (`sim`, `demo`, `compress`) are entry points of the group
`edgefleet.commands`, so `cloud` never imports them; one that fails to load is reported and skipped.
"""

from __future__ import annotations

import os
import sys
from importlib.metadata import entry_points
from typing import Annotated, Any

import typer
from typer.core import TyperGroup

from cloud import __version__
from cloud.cli.alerts import alerts_app
from cloud.cli.approvals import approvals_app
from cloud.cli.audit import audit_app
from cloud.cli.broker import broker_app
from cloud.cli.ct import ct_app
from cloud.cli.db import backup, db_app, restore
from cloud.cli.deployments import deploy, deployments_app
from cloud.cli.devices import devices_app
from cloud.cli.drift import drift_app
from cloud.cli.federated import federated_app
from cloud.cli.fleet import fleet_app
from cloud.cli.keys import approve, keys_app
from cloud.cli.models import models_app
from cloud.cli.rollouts import rollouts_app
from cloud.cli.tokens import tokens_app
from cloud.cli.up import up
from cloud.client import ApiError

__all__ = ["DEBUG_ENV", "PLUGIN_GROUP", "build_app", "main"]

PLUGIN_GROUP = "edgefleet.commands"
DEBUG_ENV = "EDGEFLEET_DEBUG"  # set to 1: an unexpected error shows its traceback


class _Commands(TyperGroup):
    """The root group: an error no command turned into a message is one line on stderr and exit 1.

    Commands report what they expect (an unreachable coordinator, a refused request, bad options) themselves;
    this is the net under them: a path that cannot be read or written, or a bug, never prints a traceback
    unless `EDGEFLEET_DEBUG=1`.
    """

    def invoke(self, ctx: Any) -> Any:
        try:
            return super().invoke(ctx)
        except (typer.TyperException, typer.Exit, typer.Abort, KeyboardInterrupt):
            raise
        except ApiError as exc:  # the coordinator unreachable or refusing, from a command that did not expect it
            _fail(str(exc))
        except OSError as exc:
            where = f": {exc.filename}" if exc.filename else ""
            _fail(f"{exc.strerror or exc}{where}")
        except Exception as exc:
            if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
                raise
            _fail(f"unexpected {type(exc).__name__}: {exc} (set {DEBUG_ENV}=1 to see where)")


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(1)


def build_app(*, load_plugins: bool = True) -> typer.Typer:
    """The `edgefleet` command tree, with plugin subcommands when `load_plugins`."""
    app = typer.Typer(
        name="edgefleet",
        help="edgefleet: run the coordinator (`edgefleet up`) and manage models, devices and deployments.",
        no_args_is_help=True,
        pretty_exceptions_enable=False,
        cls=_Commands,
    )
    app.callback()(_root)
    app.command("up")(up)
    app.add_typer(models_app, name="models")
    app.add_typer(devices_app, name="devices")
    app.command("deploy")(deploy)
    app.add_typer(deployments_app, name="deployments")
    app.add_typer(fleet_app, name="fleet")
    app.add_typer(rollouts_app, name="rollouts")
    app.add_typer(federated_app, name="federated")
    app.add_typer(drift_app, name="drift")
    app.add_typer(ct_app, name="ct")
    app.add_typer(tokens_app, name="tokens")
    app.add_typer(audit_app, name="audit")
    app.add_typer(alerts_app, name="alerts")
    app.add_typer(approvals_app, name="approvals")
    app.add_typer(broker_app, name="broker")
    app.add_typer(keys_app, name="keys")
    app.command("approve")(approve)
    app.add_typer(db_app, name="db")
    app.command("backup")(backup)
    app.command("restore")(restore)
    if load_plugins:
        _add_plugins(app)
    return app


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"edgefleet {__version__}")
        raise typer.Exit()


def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the edgefleet version and exit."),
    ] = False,
) -> None:
    """edgefleet: run the coordinator (`edgefleet up`) and manage models, devices and deployments."""


def _add_plugins(app: typer.Typer) -> None:
    for entry in entry_points(group=PLUGIN_GROUP):
        try:
            command = entry.load()
        except Exception as exc:  # a broken plugin must not take the whole CLI down
            print(f"warning: edgefleet plugin {entry.name!r} ({entry.value}) failed to load: {exc}", file=sys.stderr)
            continue
        if isinstance(command, typer.Typer):
            app.add_typer(command, name=entry.name)
        elif callable(command):
            app.command(entry.name)(command)
        else:
            print(f"warning: edgefleet plugin {entry.name!r} is neither a Typer app nor a function", file=sys.stderr)


def main() -> None:
    """Entry point of the `edgefleet` console script."""
    build_app()()
