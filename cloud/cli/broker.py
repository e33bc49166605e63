"""`edgefleet broker ...`: a Mosquitto configuration for the fleet (mTLS, per-device topic rights, CRL).

    edgefleet broker mosquitto-config --out /etc/mosquitto/edgefleet --hostname broker.example.org
    mosquitto -c /etc/mosquitto/edgefleet/mosquitto.conf
    edgefleet up --mqtt-url mqtts://broker.example.org:8883 \\
        --broker-crl-file /etc/mosquitto/edgefleet/crl.pem \\
        --broker-reload-command 'kill -HUP $(cat /etc/mosquitto/edgefleet/mosquitto.pid)'

Clients must present a certificate of the fleet CA (`require_certificate`); the certificate's CN becomes the
user name (`use_identity_as_username`) *and* the client id (`use_username_as_clientid`: one device cannot take
over another's session); the ACL file gives each device its own topics only (`cloud.broker_rights`).

Replicated coordinators (`edgefleet up --replicated --replica NAME`) each connect with a certificate of their own,
CN `edgefleet:coordinator.NAME`, so that each has a client id (a session) of its own; the ACL gives a coordinator's
rights to the CNs it lists, so every replica's stable name is given here too:

    edgefleet broker mosquitto-config --out /etc/mosquitto/edgefleet --replica coord-a --replica coord-b
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Annotated, Any

import typer

from cloud.broker_rights import mosquitto_acl, replica_identity
from cloud.cli._common import JsonOpt, emit, fail
from cloud.errors import CloudError
from cloud.pki import FleetPki
from cloud.settings import Settings
from protocol.identity import COORDINATOR_IDENTITY

__all__ = ["broker_app", "mosquitto_conf"]

broker_app = typer.Typer(help="The fleet's MQTT broker: configuration for your own Mosquitto.", no_args_is_help=True)


def mosquitto_conf(out: Path, *, bind: str, port: int, user: str | None, persistence: bool) -> str:
    """The mosquitto.conf text for a fleet listener whose files are in `out`."""
    lines = [
        "# edgefleet fleet broker (written by `edgefleet broker mosquitto-config`)",
        "per_listener_settings false",
        "allow_anonymous false",
        f"pid_file {out / 'mosquitto.pid'}",
        f"acl_file {out / 'acl'}",
        # The coordinator's session queues a whole fleet's burst while it catches up: a rollout wave of 10,000 devices
        # sends ~19 reports and events each (~190,000); past this limit Mosquitto drops QoS 1 messages silently.
        "max_queued_messages 1000000",
        "max_inflight_messages 100",
        "set_tcp_nodelay true",  # TLS handshakes and small QoS 1 messages otherwise wait out delayed ACKs
        f"persistence {'true' if persistence else 'false'}",
        f"persistence_location {out}/",
        f"listener {port} {bind}",
        f"cafile {out / 'ca.crt'}",
        f"certfile {out / 'broker.crt'}",
        f"keyfile {out / 'broker.key'}",
        f"crlfile {out / 'crl.pem'}",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        "tls_version tlsv1.2",
    ]
    if user:
        lines.insert(1, f"user {user}")
    return "\n".join(lines) + "\n"


@broker_app.command("mosquitto-config")
def mosquitto_config(
    out: Annotated[Path, typer.Option("--out", help="Directory to write mosquitto.conf, acl and the TLS files to.")],
    data_dir: Annotated[Path | None, typer.Option(help="The coordinator's data dir (its pki/ holds the CA).")] = None,
    pki_dir: Annotated[Path | None, typer.Option(help="The fleet PKI directory (default data_dir/pki).")] = None,
    config: Annotated[Path | None, typer.Option(help="Coordinator settings file (.toml or .env).", exists=True)] = None,
    bind: Annotated[str, typer.Option(help="Address Mosquitto listens on.")] = "0.0.0.0",
    port: Annotated[int, typer.Option(help="TLS port.")] = 8883,
    hostname: Annotated[
        list[str] | None, typer.Option("--hostname", help="Name or IP devices use for the broker (TLS SAN); repeat.")
    ] = None,
    topic_base: Annotated[str | None, typer.Option(help="Topic base the rights apply to.")] = None,
    user: Annotated[
        str | None, typer.Option(help="OS user Mosquitto runs as (it must read --out); '' keeps Mosquitto's default.")
    ] = "mosquitto",
    persistence: Annotated[bool, typer.Option(help="Keep sessions and retained messages across restarts.")] = True,
    replica: Annotated[
        list[str] | None,
        typer.Option(
            "--replica",
            help="Name of a coordinator replica (`edgefleet up --replicated --replica NAME`) to give a coordinator's "
            "rights to, as CN edgefleet:coordinator.NAME; repeat for each. Replicated coordinators need stable "
            "names that match these: one missing here connects but may do nothing.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Write a Mosquitto configuration: mTLS with the fleet CA, per-device topic rights, the CRL.

    Replicated coordinators: list every replica's name with --replica (the names they are started with).
    """
    try:
        coordinators = (COORDINATOR_IDENTITY, *(replica_identity(name) for name in dict.fromkeys(replica or [])))
    except ValueError as exc:
        fail(f"--replica: {exc}")
    try:
        settings = Settings.load(config, data_dir=data_dir, pki_dir=pki_dir, topic_base=topic_base)
        pki = FleetPki(settings.resolved_pki_dir, broker_hostnames=hostname or []).ensure()
    except (CloudError, ValueError, OSError) as exc:
        fail(f"cannot prepare the fleet PKI: {exc}")
    out = out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    cert, key = pki.broker_files()
    for source, name in ((pki.ca_path, "ca.crt"), (cert, "broker.crt"), (key, "broker.key"), (pki.crl_path, "crl.pem")):
        shutil.copyfile(source, out / name)
    os.chmod(out / "broker.key", 0o600)
    (out / "acl").write_text(mosquitto_acl(settings.topics, coordinators))
    (out / "mosquitto.conf").write_text(
        mosquitto_conf(out, bind=bind, port=port, user=user or None, persistence=persistence)
    )
    if user and os.geteuid() == 0 and user != "root":
        _chown(out, user)
    host = (hostname or ["127.0.0.1"])[0]
    summary: dict[str, Any] = {
        "config": str(out / "mosquitto.conf"),
        "mqtt_url": f"mqtts://{host}:{port}",
        "broker_crl_file": str(out / "crl.pem"),
        "broker_reload_command": f"kill -HUP $(cat {out / 'mosquitto.pid'})",
        "coordinators": list(coordinators),
    }
    emit(summary, as_json, _render)


def _chown(out: Path, user: str) -> None:
    for path in [out, *out.iterdir()]:
        try:
            shutil.chown(path, user=user)
        except (LookupError, PermissionError) as exc:
            typer.echo(f"warning: cannot give {path} to {user}: {exc}", err=True)


def _render(s: dict[str, Any]) -> str:
    return (
        f"wrote {s['config']} (with acl, ca.crt, broker.crt/key, crl.pem)\n"
        f"coordinator identities in the ACL: {', '.join(s['coordinators'])}\n"
        f"start Mosquitto:    mosquitto -c {s['config']}\n"
        f"start the coordinator so that revocations reach Mosquitto at once:\n"
        f"  edgefleet up --mqtt-url {s['mqtt_url']} --broker-crl-file {s['broker_crl_file']} \\\n"
        f"      --broker-reload-command '{s['broker_reload_command']}'"
    )


@broker_app.command("pki")
def pki(
    data_dir: Annotated[Path | None, typer.Option(help="The coordinator's data dir (its pki/ holds the CA).")] = None,
    pki_dir: Annotated[Path | None, typer.Option(help="The fleet PKI directory (default data_dir/pki).")] = None,
    config: Annotated[Path | None, typer.Option(help="Coordinator settings file (.toml or .env).", exists=True)] = None,
    hostname: Annotated[
        list[str] | None, typer.Option("--hostname", help="Name or IP devices use for the broker (TLS SAN); repeat.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Create the fleet's CA and the broker's and coordinator's certificates where missing; print where they are."""
    try:
        settings = Settings.load(config, data_dir=data_dir, pki_dir=pki_dir)
        fleet = FleetPki(settings.resolved_pki_dir, broker_hostnames=hostname or []).ensure()
    except (CloudError, ValueError, OSError) as exc:
        fail(f"cannot prepare the fleet PKI: {exc}")
    cert, _key = fleet.broker_files()
    summary = {
        "pki_dir": str(fleet.directory),
        "ca": str(fleet.ca_path),
        "broker_cert": str(cert),
        "crl": str(fleet.crl_path),
    }
    emit(summary, as_json, lambda s: f"fleet PKI in {s['pki_dir']} (CA {s['ca']}, broker {s['broker_cert']})")
