"""The coordinator's Flower SuperLink: started with the coordinator, restarted when it dies, gone when it stops.

With `Settings.federated`, `start_federation` runs `flower-superlink` of the Flower venv as a child process::

    flower-superlink --port P --host H --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key
                     --enable-supernode-auth --database <data_dir>/federated/superlink.db
                     --disable-runtime-dependency-installation

TLS with a server certificate of the fleet CA (`FleetPki.superlink_files`, SANs: the names devices reach it at),
SuperNode authentication on (only keys the coordinator registered may join), registrations kept in its own SQLite
database, output appended to `<data_dir>/federated/superlink.log`, `FLWR_HOME=<data_dir>/federated/flwr-home`.

It never outlives the coordinator: it runs in a process group of its own (stopped with SIGTERM, then SIGKILL), and
it is started through a two-line guard that sets PR_SET_PDEATHSIG, so a coordinator killed outright takes it along
(SIGTERM: the SuperLink then stops the SuperExec it started). A SuperLink that exits is restarted with backoff on
the same port; nodes are registered only once it is ready (its port accepts and `flwr ls` answers).

Port 0 picks a free port on the first start and keeps it in `<data_dir>/federated/superlink.json` (like the
embedded broker's `broker.json`), so devices keep finding the SuperLink after a restart. With
`Settings.superlink_url` no process is started: the same control and node registration run against that address.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy.engine import Engine

from cloud.broker_address import KeptAddress, plan_listen, port_is_busy, save_kept_address
from cloud.errors import TransientError
from cloud.federation.flower import FlowerControl, FlowerError, flower_bin_dir, flower_env
from cloud.federation.nodes import NodeReconciler, superlink_node_lookup
from cloud.pki import FleetPki
from cloud.settings import Settings, split_host_port

__all__ = [
    "ADDRESS_FILE",
    "Federation",
    "SuperLinkConfig",
    "SuperLinkProcess",
    "SuperLinkStartError",
    "check_superlink_port",
    "resolve_superlink_port",
    "start_federation",
]

log = logging.getLogger(__name__)

STATE_DIR = "federated"
ADDRESS_FILE = "superlink.json"
_PORT_SETTING = "superlink_port (EDGEFLEET_SUPERLINK_PORT, `edgefleet up --superlink-port`)"
_WILDCARDS = {"", "0.0.0.0", "::"}
_STABLE_S = 60.0  # a SuperLink that ran this long starts the backoff over when it exits
_STOP_GRACE_S = 10.0
_PROBE_TIMEOUT_S = 20.0

# Runs in the coordinator's own Python (-I -S: no site, nothing imported but ctypes) between fork and exec:
# PR_SET_PDEATHSIG (1) survives the exec, so the kernel sends the SuperLink SIGTERM when the coordinator thread that
# started it dies, SIGKILL included. A coordinator that died before the prctl is caught by the parent check.
_GUARD = (
    "import ctypes, os, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, 15, 0, 0, 0)\n"
    "os.getppid() == int(sys.argv[1]) or sys.exit(70)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


class SuperLinkStartError(TransientError):
    """The SuperLink cannot start: its port is taken, or its kept address cannot be read."""


# -- the port -------------------------------------------------------------------------------------------------


def _load_kept(path: Path) -> KeptAddress | None:
    try:
        body = json.loads(path.read_text())
        return KeptAddress(str(body["host"]), int(body["requested_port"]), int(body["port"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SuperLinkStartError(f"cannot read the SuperLink's kept address {path}: {exc}; delete it") from exc


def _busy_message(host: str, port: int, kept: Path | None) -> str:
    where = f"{host}:{port}"
    if kept is not None:
        return (
            f"the SuperLink's port {where} is taken by another process; it is kept in {kept} because devices "
            f"connect to it. Free the port, or set {_PORT_SETTING} to another port (0 picks a free one) or delete "
            f"{kept}"
        )
    return (
        f"the SuperLink's port {where} is taken by another process; set {_PORT_SETTING} to another port "
        "(0 picks a free one)"
    )


def resolve_superlink_port(state_dir: Path, host: str, requested: int) -> int:
    """The port to listen on: the kept one for a request of 0 made before, else a free one (kept), else `requested`.

    `SuperLinkStartError` (one line naming the port and the setting) when that port is taken.
    """
    port = _planned_port(state_dir, host, requested) or _free_port(host)
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    save_kept_address(state_dir / ADDRESS_FILE, KeptAddress(host, requested, port))
    return port


def check_superlink_port(settings: Settings) -> None:
    """`SuperLinkStartError` now if the embedded SuperLink would find its port taken (for `edgefleet up`)."""
    if settings.federated and not settings.superlink_url:
        _planned_port(settings.data_dir / STATE_DIR, settings.resolved_superlink_host, settings.superlink_port)


def _planned_port(state_dir: Path, host: str, requested: int) -> int:
    """The port a start listens on (0: a free one, to be picked); `SuperLinkStartError` if it is taken."""
    path = state_dir / ADDRESS_FILE
    plan = plan_listen(host, requested, _load_kept(path), fallback=False)
    if plan.port != 0 and port_is_busy(host, plan.port):
        raise SuperLinkStartError(_busy_message(host, plan.port, path if plan.kept and requested == 0 else None))
    return plan.port


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.bind((host, 0))
        return int(probe.getsockname()[1])


def _local_host(host: str) -> str:
    """Where the coordinator itself reaches a SuperLink listening on `host`."""
    if host in _WILDCARDS:
        return "::1" if host == "::" else "127.0.0.1"
    return host


def _join(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- the process ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SuperLinkConfig:
    """Everything `flower-superlink` is started with."""

    bin_dir: Path
    host: str
    port: int
    state_dir: Path  # <data_dir>/federated
    certificate: Path
    key: Path
    ca: Path

    @property
    def database(self) -> Path:
        """The SuperLink's own SQLite database (registrations, runs)."""
        return self.state_dir / "superlink.db"

    @property
    def log_file(self) -> Path:
        """Where its output is appended."""
        return self.state_dir / "superlink.log"

    @property
    def home(self) -> Path:
        """Its FLWR_HOME."""
        return self.state_dir / "flwr-home"

    def command(self) -> list[str]:
        """The `flower-superlink` command line."""
        return [
            str(self.bin_dir / "flower-superlink"),
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--ssl-ca-certfile",
            str(self.ca),
            "--ssl-certfile",
            str(self.certificate),
            "--ssl-keyfile",
            str(self.key),
            "--enable-supernode-auth",
            "--database",
            str(self.database),
            "--disable-runtime-dependency-installation",
        ]


class SuperLinkProcess:
    """`flower-superlink` supervised by a thread: started, probed until ready, restarted with backoff, stopped.

    Every operation on the process happens on the supervising thread, which outlives it: PR_SET_PDEATHSIG fires
    when the *thread* that started the child ends.
    """

    def __init__(
        self,
        config: SuperLinkConfig,
        probe: Callable[[], None],
        *,
        min_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
    ) -> None:
        """`probe` raises unless the SuperLink answers (`FlowerControl.ping`)."""
        self.config = config
        self._probe = probe
        self._min_backoff_s = min_backoff_s
        self._max_backoff_s = max_backoff_s
        self._stop = threading.Event()
        self._ready = threading.Event()
        self._thread: threading.Thread | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self.state = "stopped"
        self.starts = 0  # processes started (1 + restarts)
        self.generation = 0  # raised each time a started process becomes ready
        self.on_ready: Callable[[], None] | None = None

    @property
    def pid(self) -> int | None:
        """The running flower-superlink's pid."""
        proc = self._proc
        return proc.pid if proc is not None and proc.returncode is None else None

    @property
    def ready(self) -> bool:
        """True while the current process answers."""
        return self._ready.is_set()

    def wait_ready(self, timeout_s: float) -> bool:
        """Wait until the SuperLink answers; False after `timeout_s`."""
        return self._ready.wait(timeout_s)

    def start(self) -> None:
        """Start supervising (no-op when it runs)."""
        if self._thread is not None:
            return
        self._stop.clear()
        self.config.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.config.state_dir, 0o700)
        self.config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._thread = threading.Thread(target=self._supervise, name="superlink", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = _PROBE_TIMEOUT_S + _STOP_GRACE_S + 5) -> None:
        """Stop the SuperLink (SIGTERM to its group, SIGKILL after a grace period) and the supervision."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            self._thread = None
        self.state = "stopped"

    # -- the supervising thread ----------------------------------------------------------------------------------

    def _supervise(self) -> None:
        backoff = self._min_backoff_s
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                proc = self._spawn()
            except OSError as exc:
                log.error("cannot start flower-superlink: %s; retrying in %.0fs", exc, backoff)
                self.state = "restarting"
                self._stop.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff_s)
                continue
            self._watch(proc)
            if self._stop.is_set():
                self._terminate(proc)
                break
            self._ready.clear()
            self._reap_orphans(proc.pid)
            if time.monotonic() - started > _STABLE_S:
                backoff = self._min_backoff_s
            log.warning(
                "flower-superlink exited code=%s pid=%d; restarting in %.0fs (see %s)",
                proc.returncode,
                proc.pid,
                backoff,
                self.config.log_file,
            )
            self.state = "restarting"
            self._stop.wait(backoff)
            backoff = min(backoff * 2, self._max_backoff_s)
        self._ready.clear()

    def _spawn(self) -> subprocess.Popen[bytes]:
        config = self.config
        command = [sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), *config.command()]
        with config.log_file.open("ab") as out:
            out.write(f"--- edgefleet: starting flower-superlink on {_join(config.host, config.port)}\n".encode())
            out.flush()
            proc = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=flower_env(config.home, config.bin_dir),
                cwd=config.state_dir,
                start_new_session=True,  # its own process group: stopped as a whole, not hit by the terminal's ^C
            )
        self._proc = proc
        self.starts += 1
        self.state = "starting"
        log.info("flower-superlink started pid=%d port=%d", proc.pid, config.port)
        return proc

    def _watch(self, proc: subprocess.Popen[bytes]) -> None:
        """Probe until ready, then wait, until the process exits or a stop is asked for."""
        host = _local_host(self.config.host)
        warned_at = time.monotonic() + 60
        delay = 0.5
        while not self._stop.is_set() and proc.poll() is None and not self._ready.is_set():
            if _accepts(host, self.config.port):
                try:
                    self._probe()
                except FlowerError as exc:
                    log.debug("SuperLink not answering yet: %s", exc)
                    delay = min(delay * 1.5, 5.0)  # each probe runs a flwr process: fewer while it does not answer
                else:
                    self.generation += 1
                    self.state = "running"
                    self._ready.set()
                    log.info("flower-superlink ready pid=%d port=%d", proc.pid, self.config.port)
                    if self.on_ready is not None:
                        self.on_ready()
                    break
            if time.monotonic() > warned_at:
                log.warning("flower-superlink pid=%d not answering yet; see %s", proc.pid, self.config.log_file)
                warned_at = float("inf")
            self._stop.wait(delay)
        while not self._stop.is_set() and proc.poll() is None:
            self._stop.wait(0.5)

    def _terminate(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGTERM to the SuperLink's group, SIGKILL after the grace period; its SuperExec too."""
        self._ready.clear()
        if proc.poll() is None:
            _signal_group(proc.pid, signal.SIGTERM)
            try:
                proc.wait(_STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                log.warning("flower-superlink pid=%d ignored SIGTERM for %.0fs; killing it", proc.pid, _STOP_GRACE_S)
                _signal_group(proc.pid, signal.SIGKILL)
                proc.wait()
        self._reap_orphans(proc.pid)
        log.info("flower-superlink stopped pid=%d code=%s", proc.pid, proc.returncode)

    def _reap_orphans(self, pid: int) -> None:
        """Stop what the SuperLink started in sessions of their own (SuperExec) and left behind when it died."""
        for orphan in _started_by(pid):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(orphan, signal.SIGTERM)
                log.info("stopped a process the SuperLink left behind pid=%d", orphan)


def _signal_group(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, signum)


def _accepts(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1):
            return True
    except OSError:
        return False


def _started_by(pid: int) -> list[int]:
    """Processes started with `--parent-pid PID`, and theirs in turn (how Flower ties a SuperExec to its SuperLink
    and a ServerApp to its SuperExec); read from Linux's /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"--parent-pid" in args[:-1]:
            with contextlib.suppress(ValueError, IndexError):
                parents[int(entry.name)] = int(args[args.index(b"--parent-pid") + 1])
    found: list[int] = []
    frontier = {pid}
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier and child not in found]
        found.extend(children)
        frontier = set(children)
    return found


# -- the federation side of a coordinator ---------------------------------------------------------------------


@dataclass
class Federation:
    """What federated learning adds to a coordinator: the `flwr` control, the SuperLink (None when external), the
    node reconciler, and where devices find the SuperLink."""

    control: FlowerControl
    nodes: NodeReconciler
    device_address: str  # the SuperLink's HOST:PORT as devices reach it
    ca_file: Path  # the CA that signed the SuperLink's certificate
    superlink: SuperLinkProcess | None = None

    def start(self, wait_s: float = 0.0) -> None:
        """Start the SuperLink (if embedded) and the node reconciler; wait up to `wait_s` for the SuperLink."""
        if self.superlink is not None:
            self.superlink.start()
            if wait_s and not self.superlink.wait_ready(wait_s):
                log.warning(
                    "flower-superlink not ready after %.0fs; nodes are registered once it is (see %s)",
                    wait_s,
                    self.superlink.config.log_file,
                )
        self.nodes.start()

    def stop(self) -> None:
        """Stop the reconciler, then the SuperLink."""
        self.nodes.stop()
        if self.superlink is not None:
            self.superlink.stop()

    def nudge(self) -> None:
        """Reconcile node registrations now (after an enrolment or a revocation) rather than at the next tick."""
        self.nodes.nudge()

    def root_certificates(self) -> str:
        """PEM of the CA devices verify the SuperLink with."""
        return self.ca_file.read_text()

    def status(self) -> dict[str, Any]:
        """The SuperLink's state for `/api/v1/info` (no secrets)."""
        if self.superlink is None:
            return {"superlink": self.device_address, "mode": "external"}
        return {
            "superlink": self.device_address,
            "mode": "embedded",
            "state": self.superlink.state,
            "starts": self.superlink.starts,
        }


def start_federation(settings: Settings, pki: FleetPki, engine: Engine, *, wait_s: float = 15.0) -> Federation:
    """Build and start the federation side of a coordinator (`Settings.federated`); see the module docstring."""
    state_dir = settings.data_dir / STATE_DIR
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    bin_dir = flower_bin_dir(settings.flower_bin_dir)
    control_home = state_dir / "flwr-control"
    if settings.superlink_url:
        ca = settings.superlink_ca_file or pki.ca_path
        control = FlowerControl(
            bin_dir=bin_dir, home=control_home, address=settings.superlink_url, root_certificates=ca
        )
        nodes = NodeReconciler(engine=engine, pki=pki, control=control, tick_s=settings.flower_node_tick_s)
        federation = Federation(control, nodes, settings.device_superlink_address or settings.superlink_url, ca)
        federation.start()
        return federation
    host = settings.resolved_superlink_host
    port = resolve_superlink_port(state_dir, host, settings.superlink_port)
    device_address = settings.device_superlink_address or _join(settings.public_host(), port)
    names = {settings.public_host(), split_host_port(device_address)[0]}
    if host not in _WILDCARDS:
        names.add(host)
    cert, key = pki.superlink_files(sorted(names))
    config = SuperLinkConfig(bin_dir, host, port, state_dir, cert, key, pki.ca_path)
    control = FlowerControl(
        bin_dir=bin_dir, home=control_home, address=_join(_local_host(host), port), root_certificates=pki.ca_path
    )
    superlink = SuperLinkProcess(config, lambda: control.ping(_PROBE_TIMEOUT_S))
    nodes = NodeReconciler(
        engine=engine,
        pki=pki,
        control=control,
        tick_s=settings.flower_node_tick_s,
        ready=lambda: superlink.ready,
        generation=lambda: superlink.generation,
        lookup=superlink_node_lookup(config.database),
    )
    superlink.on_ready = nodes.nudge
    federation = Federation(control, nodes, device_address, pki.ca_path, superlink)
    federation.start(wait_s)
    return federation
