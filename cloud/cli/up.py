"""`edgefleet up`: run the coordinator (API, embedded broker or external one, MQTT bridge, and with `--federated` the
Flower SuperLink) in the foreground."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
import uvicorn

from cloud.cli._common import fail
from cloud.client import write_config_if_absent
from cloud.errors import CloudError
from cloud.logs import configure_logging
from cloud.pki import private_write
from cloud.settings import Settings, settings_error

if TYPE_CHECKING:  # the coordinator is imported only when it runs: `edgefleet --help` stays fast
    from cloud.coordinator import Coordinator

__all__ = ["up"]

INFO_FILE = "coordinator.json"


def _bind(host: str, port: int) -> socket.socket:
    """Bind the HTTP socket before the app starts, so the actual port (for `--port 0`) is known to it."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    # Accepted connections inherit it: uvicorn on a pre-bound socket leaves Nagle on, and a keep-alive
    # request then waits for the client's delayed ACK (44 ms per API call instead of under 1 ms).
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        fail(f"cannot listen on {host}:{port}: {exc.strerror or exc} (use --port 0 for a free port)")
    sock.set_inheritable(True)
    return sock


def _write_info(path: Path, *, url: str, mqtt_url: str | None) -> None:
    body = json.dumps({"url": url, "mqtt_url": mqtt_url, "pid": os.getpid()}, indent=2) + "\n"
    private_write(path, body.encode())


def up(
    data_dir: Annotated[
        Path | None, typer.Option(help="Database, artifacts, admin token [env EDGEFLEET_DATA_DIR].")
    ] = None,
    database_url: Annotated[str | None, typer.Option(help="SQLAlchemy URL (default: SQLite in the data dir).")] = None,
    mqtt_url: Annotated[
        str | None, typer.Option(help="External broker, e.g. mqtt://host:1883 (default: embedded).")
    ] = None,
    host: Annotated[str | None, typer.Option(help="HTTP listen address (default 127.0.0.1).")] = None,
    port: Annotated[int | None, typer.Option(help="HTTP port (default 8080; 0 picks a free one).")] = None,
    broker_crl_file: Annotated[
        Path | None, typer.Option(help="Keep a copy of the CRL here for an external broker (Mosquitto's crlfile).")
    ] = None,
    broker_reload_command: Annotated[
        str | None, typer.Option(help="Run after a revocation so the broker re-reads the CRL, e.g. 'kill -HUP PID'.")
    ] = None,
    federated: Annotated[
        bool | None,
        typer.Option(
            "--federated/--no-federated",
            help="Federated learning: run a Flower SuperLink and register devices with it [env EDGEFLEET_FEDERATED].",
        ),
    ] = None,
    superlink_port: Annotated[
        int | None, typer.Option(help="Port of the SuperLink (default 9092; 0 picks a free one and keeps it).")
    ] = None,
    superlink_url: Annotated[
        str | None, typer.Option(help="Use this external SuperLink (HOST:PORT) instead of starting one.")
    ] = None,
    flower_bin_dir: Annotated[
        Path | None, typer.Option(help="bin directory of the Flower venv (default: .venv-flower/bin beside this one).")
    ] = None,
    replicated: Annotated[
        bool | None,
        typer.Option(
            "--replicated/--no-replicated",
            help="One of several replicas on one PostgreSQL and one broker: inbound MQTT through shared "
            "subscriptions, rollouts and periodic jobs by leases in the database [env EDGEFLEET_REPLICATED].",
        ),
    ] = None,
    replica: Annotated[
        str | None,
        typer.Option(
            help="This replica's name, unique and stable (at most 42 of A-Z a-z 0-9 . _ -): its broker certificate "
            "is CN edgefleet:coordinator.NAME, which the broker's ACL must list (edgefleet broker mosquitto-config "
            "--replica NAME). Default <hostname>-<pid>, new at every start.",
        ),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="Settings file (.toml or .env).", exists=True)] = None,
    log_json: Annotated[bool, typer.Option("--log-json", help="Log JSON lines instead of key=value.")] = False,
) -> None:
    """Run the coordinator until Ctrl-C or SIGTERM.

    Prints the API URL, the broker URL and (on first start) the admin token; writes data_dir/coordinator.json
    with the actual URLs and pid, and the CLI config (url + token) if it does not exist yet.
    """
    configure_logging(json_lines=log_json)
    settings = _settings(
        config,
        data_dir=data_dir,
        database_url=database_url,
        mqtt_url=mqtt_url,
        host=host,
        port=port,
        broker_crl_file=broker_crl_file,
        broker_reload_command=broker_reload_command,
        federated=federated,
        superlink_port=superlink_port,
        superlink_url=superlink_url,
        flower_bin_dir=flower_bin_dir,
        replicated=replicated,
        replica=replica,
    )
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    sock = _bind(settings.host, settings.port)
    settings = settings.model_copy(update={"port": sock.getsockname()[1]})
    _serve(settings, sock)


def _settings(config: Path | None, **given: Any) -> Settings:
    """Settings from the file, the environment and the options; exits with the reason if they are unusable."""
    try:
        settings = Settings.load(config, **given)
        settings.check_production_ready()
    except (CloudError, ValueError) as exc:
        fail(f"invalid settings: {settings_error(exc)}")
    return settings


def _announce(settings: Settings, info_path: Path) -> Callable[[Coordinator], None]:
    """What to do once the coordinator is up: write coordinator.json and the CLI config, print the URLs."""

    def on_started(coordinator: Coordinator) -> None:
        url = coordinator.settings.resolved_public_url()
        _write_info(info_path, url=url, mqtt_url=coordinator.device_mqtt_url)
        lines = [
            f"edgefleet coordinator {url}",
            f"  MQTT broker: {coordinator.device_mqtt_url}",
            f"  data dir:    {settings.data_dir}",
            f"  database:    {_redact(settings.database_url)}",
        ]
        if coordinator.federation is not None:
            lines.insert(2, f"  SuperLink:   {coordinator.federation.device_address}")
        if coordinator.admin_token_created:
            lines.append(f"  admin token: {coordinator.admin_token}  (shown once; kept in data_dir/admin-token)")
        written = write_config_if_absent(url=url, token=coordinator.admin_token)
        if written is not None:
            lines.append(f"  CLI config:  {written}")
        print("\n".join(lines), flush=True)

    return on_started


def _serve(settings: Settings, sock: socket.socket) -> None:
    """Run the app on `sock` until a stop is requested; exit 1 if it never started."""
    from cloud.app import create_app  # deferred: `edgefleet --help` stays fast

    info_path = settings.data_dir / INFO_FILE
    try:
        _upgrade_database(settings)  # here, so that a refusal is one clear line rather than a lifespan traceback
        _check_broker_address(settings)  # likewise: the embedded broker's kept port must be free
        _check_federation(settings)  # and the Flower venv must be there, the SuperLink's port free
        app = create_app(settings, on_started=_announce(settings, info_path))
    except CloudError as exc:
        fail(str(exc))
    server = uvicorn.Server(
        uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5, lifespan="on")
    )
    # uvicorn captures SIGINT/SIGTERM for a graceful shutdown and re-raises the signal afterwards; with
    # these no-op handlers in place that re-raise is harmless, so a requested stop exits 0 after cleanup.
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, _stop_requested)
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
        info_path.unlink(missing_ok=True)
    if not server.started:
        sys.exit(1)


def _upgrade_database(settings: Settings) -> None:
    """Bring the database to this release's schema (`edgefleet db upgrade`); `CloudError` if it cannot."""
    from cloud.db import create_db_engine, upgrade_db

    engine = create_db_engine(settings.database_url)
    try:
        upgrade_db(engine)
    finally:
        engine.dispose()


def _check_broker_address(settings: Settings) -> None:
    """`BrokerStartError` if the embedded broker would find the port it keeps (`broker.json`) taken."""
    if settings.mqtt_url is not None:
        return
    from cloud.broker_address import check_kept_address

    check_kept_address(settings.data_dir, settings.embedded_broker_host, settings.embedded_broker_port)


def _check_federation(settings: Settings) -> None:
    """`CloudError` if federated learning is on but the Flower venv is missing or the SuperLink's port is taken."""
    if not settings.federated:
        return
    from cloud.federation import check_superlink_port, flower_bin_dir

    flower_bin_dir(settings.flower_bin_dir)
    check_superlink_port(settings)


def _stop_requested(signum: int, _frame: object) -> None:
    """Placeholder handler: uvicorn handles the stop itself while it runs."""


def _redact(database_url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(database_url).render_as_string(hide_password=True)
    except Exception:  # only for display
        return "<unparsable>"
