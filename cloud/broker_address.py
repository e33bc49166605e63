"""The embedded broker keeps its address: the port picked on first start is reused on every later start.

Devices learn the broker's URL once (at enrolment) and retry it after every disconnect. An embedded broker whose
requested port was busy listens on a free port instead; without this file it would pick *another* free port
after a restart and strand every device. `broker.json` in the data directory records what was asked for
(host, port) and what was got; a later start asking for the same thing listens on the port got, and refuses to
start when that port is taken rather than move. Asking for something else (another `embedded_broker_port` or
host) picks anew, as does deleting the file.

`plan_listen` decides (pure); `load_kept_address`, `save_kept_address` and `check_kept_address` do the IO.
"""

from __future__ import annotations

import errno
import json
import socket
from dataclasses import asdict, dataclass
from pathlib import Path

from cloud.errors import BrokerStartError
from cloud.pki import private_write

__all__ = [
    "ADDRESS_FILE",
    "KeptAddress",
    "ListenPlan",
    "check_kept_address",
    "kept_port_taken",
    "load_kept_address",
    "plan_listen",
    "port_is_busy",
    "save_kept_address",
]

ADDRESS_FILE = "broker.json"
_FORMAT = 1


@dataclass(frozen=True)
class KeptAddress:
    """What a broker was asked to listen on (`host`, `requested_port`) and the `port` it got."""

    host: str
    requested_port: int
    port: int


@dataclass(frozen=True)
class ListenPlan:
    """Where to listen: `port`, and whether a busy port may be swapped for a free one (never for a kept port)."""

    port: int
    fallback: bool
    kept: KeptAddress | None = None


def plan_listen(host: str, requested_port: int, kept: KeptAddress | None, *, fallback: bool = True) -> ListenPlan:
    """The kept port when the request is the one it was kept for; otherwise the request (with `fallback`). Pure."""
    if kept is not None and kept.host == host and kept.requested_port == requested_port:
        return ListenPlan(kept.port, fallback=False, kept=kept)
    return ListenPlan(requested_port, fallback=fallback)


def kept_port_taken(path: Path, kept: KeptAddress) -> str:
    """The one-line refusal when the kept port is taken: which port, which file, what to do."""
    return (
        f"the embedded MQTT broker's port {kept.host}:{kept.port} is taken by another process; it is kept in {path} "
        "because enrolled devices connect to it. Free the port and start again, or pick a new one by setting "
        f"embedded_broker_port (EDGEFLEET_EMBEDDED_BROKER_PORT) or deleting {path} "
        "(devices must then rediscover the broker)"
    )


def load_kept_address(path: Path) -> KeptAddress | None:
    """The address kept in `path`, None without one; `BrokerStartError` for a file that cannot be read."""
    try:
        body = json.loads(path.read_text())
        if body.get("format", _FORMAT) > _FORMAT:
            raise ValueError(f"format {body['format']} is newer than this edgefleet's ({_FORMAT})")
        return KeptAddress(str(body["host"]), int(body["requested_port"]), int(body["port"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise BrokerStartError(
            f"cannot read the embedded broker's kept address {path}: {exc}; delete it to pick a new port"
        ) from exc


def save_kept_address(path: Path, address: KeptAddress) -> None:
    """Write `address` to `path` atomically (temp file + rename); unchanged content is not rewritten."""
    body = json.dumps({"format": _FORMAT, **asdict(address)}, indent=2) + "\n"
    try:
        if path.read_text() == body:
            return
    except OSError:
        pass
    private_write(path, body.encode())


def port_is_busy(host: str, port: int) -> bool:
    """True if something already listens on host:port (binding it fails with EADDRINUSE)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as exc:
            return exc.errno == errno.EADDRINUSE
    return False


def check_kept_address(state_dir: Path, host: str, requested_port: int) -> None:
    """`BrokerStartError` (the `kept_port_taken` line) now, if a start would find its kept port taken."""
    path = state_dir / ADDRESS_FILE
    plan = plan_listen(host, requested_port, load_kept_address(path))
    if plan.kept is not None and port_is_busy(host, plan.port):
        raise BrokerStartError(kept_port_taken(path, plan.kept))
