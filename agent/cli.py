"""`edgefleet-agent`: enrol the device, run the daemon, or print an example configuration.

edgefleet-agent init --device-id cam-0001 --coordinator http://coordinator:8000 > agent.toml
edgefleet-agent enroll --config agent.toml --token eft_...      # the token from `edgefleet devices enroll`
edgefleet-agent run --config agent.toml
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

# The agent never runs httpx's own command line, whose module loads rich, pygments and click (~3 MiB resident)
# whenever they happen to be installed: mark it absent before httpx is first imported (httpx then defines a stub).
sys.modules.setdefault("httpx._main", None)  # type: ignore[arg-type]

from agent.config import ENV_PREFIX, load_config  # noqa: E402
from agent.daemon import Agent, agent_version  # noqa: E402
from agent.errors import ConfigError, TransportError  # noqa: E402
from agent.identity import enrol  # noqa: E402
from protocol import TopicError, validate_device_id  # noqa: E402

__all__ = ["example_config", "main"]

log = logging.getLogger("agent.cli")

EXIT_CONFIG = 2
EXIT_UNAVAILABLE = 3


def example_config(device_id: str, coordinator_url: str | None, mqtt_url: str | None = None) -> str:
    """A commented example `agent.toml`."""
    coordinator = (
        f'coordinator_url = "{coordinator_url}"' if coordinator_url else '# coordinator_url = "http://coordinator:8000"'
    )
    broker = f'mqtt_url = "{mqtt_url}"' if mqtt_url else '# mqtt_url = "mqtt://broker:1883"'
    return f"""# edgefleet-agent configuration. Every key can be overridden by {ENV_PREFIX}<KEY>,
# e.g. {ENV_PREFIX}HTTP_PORT=disabled or {ENV_PREFIX}TAGS=site=lab,ring=canary.

# This device's id (letters, digits, . _ -); it appears in MQTT topics.
device_id = "{device_id}"

# Slots, downloads, update state and the telemetry sequence live here (relative to this file).
data_dir = "edgefleet-agent-data"

# The coordinator tells the agent its MQTT URL and topic base (GET /api/v1/info) ...
{coordinator}
# ... unless they are set here.
{broker}
# topic_base = "edgefleet/v1"

# Local Open Inference Protocol endpoint; http_port = 0 picks a free port, "disabled" turns it off.
http_host = "127.0.0.1"
http_port = 8500

# Seconds between telemetry windows (empty windows are not sent). Each window waits on disk until the
# coordinator confirms it, and is sent again after telemetry_resend_s; beyond the outbox bounds the oldest
# are dropped (and counted). telemetry_outbox_windows = 0 keeps nothing on disk.
telemetry_interval_s = 10
telemetry_resend_s = 30
# Share of calls whose inputs and confidence are sketched for drift detection (1 = every call).
telemetry_sketch_rate = 0.125
telemetry_outbox_windows = 10000
telemetry_outbox_bytes = 67108864

# Seconds a change in the middle of an update waits before the retained reported state is sent (with the
# state of that moment; each phase still sends its event, the end of an update goes out at once). 0 = every change.
report_interval_s = 0.2

# MQTT reconnect backoff bounds, download timeout and attempts, threads per inference.
reconnect_min_s = 1
reconnect_max_s = 60
download_timeout_s = 60
download_attempts = 3
intra_op_threads = 1

# What the coordinator's variant policy sees (docs/variants.md); detected unless set. `runtimes` limits the
# agent to some installed runtimes; `cpu_features` and `memory_mb` replace the detected values.
# runtimes = ["onnxruntime", "litert"]
# cpu_features = ["avx2", "avx512_vnni"]
# memory_mb = 512

# Update safety. A shadow run lets the new model answer the next N live requests beside the serving one
# (callers keep the serving model's answers) and refuses it when their argmax disagrees too often.
shadow_inferences = 0
shadow_max_disagreement = 0.05
shadow_timeout_s = 300
shadow_on_timeout = "pass"
# After the switch the new model is on trial: committed after commit_after_s, rolled back when the agent
# starts more than max_trial_boots times before that.
commit_after_s = 5
max_trial_boots = 3

# Labels that deployments target, e.g. `edgefleet deploy digits:1.0 --to site=lab`.
[tags]
# site = "lab"
"""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgefleet-agent",
        description="The edgefleet device agent: receives models over MQTT, serves them on a local "
        "Open Inference Protocol endpoint and reports state and telemetry.",
    )
    parser.add_argument("--version", action="version", version=f"edgefleet-agent {agent_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the agent until SIGTERM or SIGINT")
    run.add_argument("--config", "-c", type=Path, help=f"TOML configuration file (overridden by {ENV_PREFIX}*)")
    run.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    run.add_argument("--plain-logs", action="store_true", help="human-readable log lines instead of JSON")

    enroll = commands.add_parser(
        "enroll",
        help="make this device's key, get its certificate from the coordinator (one-time token)",
        description="Make the device's private key (it never leaves the device), send a certificate request "
        "with the one-time enrolment token from `edgefleet devices enroll ID` (or the fleet's bootstrap "
        "secret, for factory provisioning), and store the certificate, the fleet CA and the broker address "
        "in data_dir/identity.",
    )
    enroll.add_argument("--config", "-c", type=Path, help="the agent's TOML configuration (device id, data dir)")
    enroll.add_argument("--coordinator", help="coordinator base URL (default: coordinator_url of the config)")
    enroll.add_argument("--device-id", help="this device's id (default: device_id of the config)")
    enroll.add_argument("--data-dir", type=Path, help="where the identity is kept (default: data_dir of the config)")
    secret = enroll.add_mutually_exclusive_group(required=True)
    secret.add_argument("--token", help="the one-time enrolment token")
    secret.add_argument("--bootstrap-secret", help="the fleet's bootstrap secret (weaker: factory provisioning)")

    init = commands.add_parser("init", help="print a commented example configuration to stdout")
    init.add_argument("--device-id", required=True, help="this device's id")
    init.add_argument("--coordinator", help="coordinator base URL, e.g. http://coordinator:8000")
    init.add_argument("--mqtt-url", help="broker URL, when not taken from the coordinator")
    return parser


def _run(config_path: Path | None, stop: threading.Event) -> int:
    try:
        config = load_config(config_path)
    except ConfigError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    agent = Agent(config)
    delay = config.reconnect_min_s
    while not stop.is_set():
        try:
            agent.start()
            break
        except TransportError as exc:  # the coordinator may come up after the device: keep trying
            log.warning("cannot start yet (%s); retrying in %.0fs", exc, delay)
            stop.wait(delay)
            delay = min(delay * 2, config.reconnect_max_s)
        except ConfigError as exc:
            log.error("%s", exc)
            return EXIT_CONFIG
    else:
        return 0
    stop.wait()
    log.info("stopping on signal")
    agent.stop()
    return 0


def _enroll(args: argparse.Namespace) -> int:
    """`edgefleet-agent enroll`: settings from the options, else from the configuration file."""
    config = None
    if args.config is not None or not (args.coordinator and args.device_id and args.data_dir):
        try:
            config = load_config(args.config)
        except ConfigError as exc:
            print(f"edgefleet-agent: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    coordinator = args.coordinator or (config.coordinator_url if config else None)
    device_id = args.device_id or (config.device_id if config else None)
    data_dir = args.data_dir or (config.data_dir if config else None)
    if not coordinator or not device_id or data_dir is None:
        print("edgefleet-agent: enroll needs --coordinator, --device-id, --data-dir (or --config)", file=sys.stderr)
        return EXIT_CONFIG
    try:
        identity = enrol(
            data_dir=data_dir,
            coordinator_url=coordinator,
            device_id=device_id,
            token=args.token,
            bootstrap_secret=args.bootstrap_secret,
        )
    except ConfigError as exc:
        print(f"edgefleet-agent: enrolment refused: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except TransportError as exc:
        print(f"edgefleet-agent: {exc}", file=sys.stderr)
        return EXIT_UNAVAILABLE
    not_after = identity.certificate().not_valid_after_utc.isoformat()
    print(f"enrolled {identity.device_id}: certificate valid until {not_after}; broker {identity.broker_url}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `edgefleet-agent`."""
    from agent._logging import configure_logging

    args = _parser().parse_args(argv)
    if args.command == "init":
        try:
            validate_device_id(args.device_id)
        except TopicError as exc:
            print(f"edgefleet-agent: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        sys.stdout.write(example_config(args.device_id, args.coordinator, args.mqtt_url))
        return 0
    if args.command == "enroll":
        return _enroll(args)
    configure_logging(args.log_level, json_lines=not args.plain_logs)
    stop = threading.Event()

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    return _run(args.config, stop)


if __name__ == "__main__":
    sys.exit(main())
