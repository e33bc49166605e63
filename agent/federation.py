"""SuperNode supervision: the device's Flower SuperNode, started, watched and stopped with the agent.

With `federated = true` the agent runs `flower-supernode` (from the Flower venv, `locate_supernode`) joined
to the fleet's SuperLink: its address and the CA of its certificate come from the configuration
(`superlink`, `superlink_root_certificates`) or from the coordinator (`GET /api/v1/enrolment/federation`).
The SuperNode authenticates with the device's enrolment key in OpenSSH form (`<data_dir>/federated/node_key`,
rewritten when the identity's key changes) and is told where the sample store is (`--node-config`).

    <data_dir>/federated/node_key        the enrolment key, OpenSSH private key form (0600)
    <data_dir>/federated/node_key.pub    its public key (what `flwr supernode register` takes)
    <data_dir>/federated/root.pem        the CA that signed the SuperLink's certificate
    <data_dir>/federated/supernode.log   the SuperNode's output (rotated at start and beyond 1 MiB)
    <data_dir>/federated/flwr-home/      its FLWR_HOME (installed Flower Apps)

The SuperNode runs under a small guard process (`_GUARD`) in a process group of its own: the guard asks
the kernel for SIGTERM when the agent dies (`PR_SET_PDEATHSIG`), and then stops the SuperNode and kills
the whole group, the SuperExec and ClientApps the SuperNode started included. (Flower's children watch
their parent by pid, which a zombie keeps alive where PID 1 does not reap.) The supervisor restarts an
exited SuperNode with a backoff; a SuperLink that refuses the node (key not registered) gets a slow one,
a log line and a `refused` callback (the agent's `federated.refused` event).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import IO, Literal

from agent._federation_status import FederationStatus
from agent._fs import atomic_write_bytes
from agent.config import split_host_port
from agent.errors import AgentError, ConfigError, TransportError

__all__ = [
    "FLOWER_BIN_ENV",
    "Backoff",
    "FederationInfo",
    "FederationStatus",
    "FederationUnavailableError",
    "SupernodeSupervisor",
    "classify_exit",
    "fetch_federation",
    "locate_supernode",
    "node_config",
    "node_key_openssh",
]

log = logging.getLogger(__name__)

FLOWER_BIN_ENV = "EDGEFLEET_FLOWER_BIN_DIR"
SUPERNODE = "flower-supernode"
FEDERATED_DIR = "federated"
LOG_MAX_BYTES = 1024 * 1024
# Flower logs "Exit Code: 305" (SUPERNODE_CONNECTION_ERROR) when it cannot join, and exits with status 1.
_FLOWER_CODE = re.compile(r"Exit Code: (\d+)")
# Fleet API errors that mean "not admitted": 2001 registration disabled (no key), 2004 activation failed (unknown key).
_REFUSAL = re.compile(r"\[code: (2001|2004)\]")
_NODE_ID = re.compile(r"SuperNode ID: (\d+)")
_ANSI = re.compile(rb"\x1b\[[0-9;]*[A-Za-z]")
# A SuperNode that died without leaving stays "online" at the SuperLink until its heartbeat lapses (2 x 30 s);
# meanwhile the SuperLink refuses the same node again with the same [code: 2004] as an unknown key.
STALE_SESSION_S = 75.0
STALE_RETRY_S = 15.0  # how often a node refused for a held session tries again (not the growing backoff)


class FederationUnavailableError(AgentError):
    """The coordinator has federated learning off (404): nothing to join; asked again slowly."""


@dataclass(frozen=True)
class FederationInfo:
    """Where the SuperLink is (`host:port`) and the PEM of the CA that signed its certificate."""

    superlink: str
    root_certificates: str


@dataclass(frozen=True)
class Backoff:
    """Waits of the supervisor, in seconds (a SuperNode that ran `stable_s` starts the backoff over)."""

    min_s: float = 1.0
    max_s: float = 60.0
    refused_min_s: float = 10.0  # a device enrolled a moment ago is registered within seconds: ask again soon
    refused_max_s: float = 900.0
    disabled_s: float = 300.0
    stable_s: float = 60.0
    stop_grace_s: float = 5.0
    key_check_s: float = 30.0


# -- pure pieces ----------------------------------------------------------------------------------------------


def classify_exit(code: int, output: str) -> Literal["refused", "failed"]:
    """`refused` when the SuperLink would not admit the node (its key is not registered), else `failed`.

    Flower logs `Exit Code: 305` for every failed first connection; the Fleet API code in its output
    (`[code: 2004]` unknown key, `[code: 2001]` no key while node auth is on) tells a refusal apart.
    """
    if code != 0 and _REFUSAL.search(output):
        return "refused"
    return "failed"


def node_config(store: Path, device_id: str) -> str:
    """The `--node-config` value: the sample store's absolute path and the device id, as TOML strings."""
    return f"sample-store={_toml_string(str(store))} device-id={_toml_string(device_id)}"


def _toml_string(value: str) -> str:
    escaped = value.replace("\\", "\\\\").replace('"', '\\"')
    return '"' + "".join(c if c.isprintable() else f"\\u{ord(c):04x}" for c in escaped) + '"'


def node_key_openssh(key_path: Path) -> tuple[bytes, bytes]:
    """`(private, public)` OpenSSH forms of the enrolment key in `key_path` (PEM); `ConfigError` if unusable."""
    from cryptography.hazmat.primitives import serialization  # here: an agent that is not federated never loads it
    from cryptography.hazmat.primitives.asymmetric import ec

    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        raise ConfigError(f"cannot read the device key {key_path} for the SuperNode: {exc}") from exc
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{key_path} is not an EC key; Flower's node authentication needs one (enrol again)")
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    return private, public + b"\n"


def locate_supernode(configured: Path | None, env: Mapping[str, str] | None = None) -> Path:
    """The `flower-supernode` binary: in `configured` (flower_bin_dir), `$EDGEFLEET_FLOWER_BIN_DIR`, the
    `.venv-flower/bin` beside this interpreter's venv, or on PATH; `ConfigError` naming the setting."""
    env = os.environ if env is None else env
    if configured is not None or env.get(FLOWER_BIN_ENV):
        directory = configured if configured is not None else Path(env[FLOWER_BIN_ENV])
        source = "flower_bin_dir" if configured is not None else FLOWER_BIN_ENV
        binary = directory / SUPERNODE
        if not _executable(binary):
            raise ConfigError(f"{source} is {directory}, which has no executable {SUPERNODE}")
        return binary.absolute()
    sibling = Path(sys.prefix).parent / ".venv-flower" / "bin" / SUPERNODE
    if _executable(sibling):
        return sibling
    found = shutil.which(SUPERNODE, path=env.get("PATH"))
    if found:
        return Path(found).absolute()
    raise ConfigError(
        f"federated = true, but no {SUPERNODE} was found: set flower_bin_dir (or {FLOWER_BIN_ENV}) to the bin "
        "directory of the Flower venv (`make flower` builds .venv-flower), or put it on PATH"
    )


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def fetch_federation(coordinator_url: str, timeout_s: float = 10.0) -> FederationInfo:
    """Ask the coordinator where its SuperLink is; `FederationUnavailableError` (404: off), `TransportError`."""
    import httpx

    url = f"{coordinator_url.rstrip('/')}/api/v1/enrolment/federation"
    try:
        response = httpx.get(url, timeout=timeout_s)
    except httpx.HTTPError as exc:
        raise TransportError(f"cannot ask {url} where the SuperLink is: {exc}") from exc
    if response.status_code == 404:
        raise FederationUnavailableError(f"the coordinator has federated learning off ({url} answered 404)")
    if response.status_code != 200:
        raise TransportError(f"{url} answered {response.status_code}: {response.text[:200]}")
    try:
        body = response.json()
        info = FederationInfo(superlink=str(body["superlink"]), root_certificates=str(body["root_certificates"]))
        split_host_port(info.superlink)
    except (ValueError, KeyError, TypeError) as exc:
        raise TransportError(f"{url} answered something that is not a SuperLink location: {exc}") from exc
    if "BEGIN CERTIFICATE" not in info.root_certificates:
        raise TransportError(f"{url} gave no PEM root certificate for the SuperLink")
    return info


def configured_federation(superlink: str, root_certificates: Path) -> Callable[[], FederationInfo]:
    """A locator of a SuperLink named in the configuration (the PEM is read at every start)."""

    def locate() -> FederationInfo:
        try:
            pem = root_certificates.read_text()
        except OSError as exc:
            raise ConfigError(f"superlink_root_certificates: cannot read {root_certificates}: {exc}") from exc
        return FederationInfo(superlink=superlink, root_certificates=pem)

    return locate


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# The guard between the agent and the SuperNode (run by the agent's interpreter with -I -S: stdlib only).
# It is single-threaded, so it, not the agent, asks for PR_SET_PDEATHSIG (a preexec_fn is unsafe in the
# threaded agent). argv: agent pid, grace seconds, the SuperNode command.
_GUARD = r"""
import ctypes, os, signal, subprocess, sys, time
agent, grace, command = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3:]
watched = {signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD}
signal.pthread_sigmask(signal.SIG_BLOCK, watched)
prctl = getattr(ctypes.CDLL(None, use_errno=True), "prctl", None)
if prctl is not None:
    prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM when the agent dies
if os.getppid() != agent:  # it died before the request above
    sys.exit(0)
def child_setup():
    signal.pthread_sigmask(signal.SIG_UNBLOCK, watched)
    if prctl is not None:
        prctl(1, signal.SIGKILL)
child = subprocess.Popen(command, preexec_fn=child_setup)
while signal.sigwait(watched) == signal.SIGCHLD:
    code = child.poll()
    if code is not None:
        sys.exit(code if code >= 0 else 128 - code)
child.send_signal(signal.SIGTERM)
deadline = time.monotonic() + grace
while child.poll() is None and deadline > time.monotonic():
    signal.sigtimedwait({signal.SIGCHLD}, 0.1)
os.killpg(0, signal.SIGKILL)
"""


class _LogFile:
    """The SuperNode's output, plain text, moved to `<name>.1` beyond `max_bytes` (so at most twice that)."""

    def __init__(self, path: Path, max_bytes: int = LOG_MAX_BYTES) -> None:
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists() and path.stat().st_size:
            os.replace(path, path.with_name(path.name + ".1"))  # the previous run's output
        self._file: IO[bytes] = path.open("ab")
        self._size = 0

    def write(self, line: bytes) -> None:
        with self._lock:
            if self._file.closed:
                return
            if self._size + len(line) > self.max_bytes:
                self._file.close()
                os.replace(self.path, self.path.with_name(self.path.name + ".1"))
                self._file = self.path.open("ab")
                self._size = 0
            self._file.write(line)
            self._file.flush()
            self._size += len(line)

    def close(self) -> None:
        with self._lock:
            self._file.close()


class _Waits:
    """The growing waits of the supervisor (each doubles up to its cap), and the stale-session deadline."""

    def __init__(self, backoff: Backoff) -> None:
        self._first = {"failed": backoff.min_s, "refused": backoff.refused_min_s, "locate": backoff.min_s}
        self._cap = {"failed": backoff.max_s, "refused": backoff.refused_max_s, "locate": backoff.max_s}
        self._next = dict(self._first)
        self.stale_until = 0.0  # a refusal before this may be the SuperLink still holding a crashed session

    def next(self, kind: str) -> float:
        value = self._next[kind]
        self._next[kind] = min(self._cap[kind], value * 2)
        return value

    def reset(self, *kinds: str) -> None:
        for kind in kinds:
            self._next[kind] = self._first[kind]


class _Run:
    """One started SuperNode (under its guard) and the thread reading its output."""

    def __init__(self, proc: subprocess.Popen[bytes], logfile: _LogFile, on_node_id: Callable[[str], None]) -> None:
        self.proc = proc
        self.started = time.monotonic()
        self.joined = False  # the SuperLink admitted it (it logged its node id)
        self.tail: deque[str] = deque(maxlen=40)
        self._logfile = logfile
        self._on_node_id = on_node_id
        self.reader = threading.Thread(target=self._read, name=f"supernode-log-{proc.pid}", daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for raw in self.proc.stdout:
            line = _ANSI.sub(b"", raw)
            self._logfile.write(line)
            text = line.decode("utf-8", "replace").rstrip()
            self.tail.append(text)
            if match := _NODE_ID.search(text):
                self.joined = True
                self._on_node_id(match.group(1))
        self.proc.stdout.close()

    def output(self) -> str:
        self.reader.join(2.0)  # the group is gone: the pipe's last writer closed it
        return "\n".join(self.tail)

    def signal_group(self, signum: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signum)


class SupernodeSupervisor:
    """Keeps one `flower-supernode` running while the agent runs; `start()`, `status`, `stop()`."""

    def __init__(
        self,
        *,
        device_id: str,
        data_dir: Path,
        supernode: Path,
        key_path: Callable[[], Path],
        store_path: Path,
        locate: Callable[[], FederationInfo],
        on_refused: Callable[[str], None] | None = None,
        backoff: Backoff | None = None,
    ) -> None:
        self.device_id = device_id
        self.directory = (data_dir / FEDERATED_DIR).absolute()
        self.supernode = supernode
        self._key_path = key_path
        self._store_path = store_path
        self._locate = locate
        self._on_refused = on_refused
        self._backoff = backoff or Backoff()
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._status = FederationStatus(state="stopped")
        self._thread: threading.Thread | None = None
        self._run: _Run | None = None
        self._logfile: _LogFile | None = None
        self._launches = 0
        self._said: set[str] = set()

    @property
    def status(self) -> FederationStatus:
        """A snapshot of what the supervisor is doing."""
        with self._lock:
            return self._status

    @property
    def log_path(self) -> Path:
        """The SuperNode's output."""
        return self.directory / "supernode.log"

    @property
    def key_path(self) -> Path:
        """The OpenSSH private key the SuperNode authenticates with."""
        return self.directory / "node_key"

    def start(self) -> None:
        """Write the node key (a `ConfigError` now rather than in the thread), then supervise in a thread."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._refresh_key()
        self._logfile = _LogFile(self.log_path)
        self._stop.clear()
        self._set(state="waiting-for-superlink")
        self._thread = threading.Thread(target=self._supervise, name=f"{self.device_id}-supernode", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the SuperNode (SIGTERM, then SIGKILL of its group after the grace time) and the thread."""
        self._stop.set()
        run = self._run
        if run is not None:
            with contextlib.suppress(ProcessLookupError):
                run.proc.send_signal(signal.SIGTERM)  # the guard stops the SuperNode, then kills the group
        if self._thread is not None:
            self._thread.join(self._backoff.stop_grace_s + 10.0)
            self._thread = None
        if self._logfile is not None:
            self._logfile.close()
        self._set(state="stopped", pid=None)

    # -- the supervising thread ---------------------------------------------------------------------------

    def _supervise(self) -> None:
        waits = _Waits(self._backoff)
        while not self._stop.is_set():
            info = self._find_superlink()
            if not isinstance(info, FederationInfo):
                self._stop.wait(self._backoff.disabled_s if info == "disabled" else waits.next("locate"))
                continue
            waits.reset("locate")
            try:
                run = self._launch(info)
            except (OSError, AgentError) as exc:
                self._set(state="restarting", last_error=f"cannot start {SUPERNODE}: {exc}")
                self._say(f"launch:{exc}", logging.ERROR, "cannot start %s (retrying): %s", SUPERNODE, exc)
                self._stop.wait(waits.next("failed"))
                continue
            outcome = self._watch(run)
            if outcome == "stopped":
                break
            if outcome == "exited":
                self._stop.wait(self._after_exit(run, info, waits))
        self._set(state="stopped", pid=None)

    def _after_exit(self, run: _Run, info: FederationInfo, waits: _Waits) -> float:
        """Record why the SuperNode exited; how long to wait before starting it again."""
        code, output = run.proc.returncode, run.output()
        if time.monotonic() - run.started >= self._backoff.stable_s:
            waits.reset("failed", "refused")
        if run.joined and code != 0:  # not a graceful leave: the SuperLink keeps its session a while
            waits.stale_until = time.monotonic() + STALE_SESSION_S
        flower_code = _flower_code(output)
        refused = classify_exit(code, output) == "refused"
        if refused and time.monotonic() >= waits.stale_until:
            wait = waits.next("refused")
            self._refused(info, code, flower_code, output, wait)
            return wait
        reason = _exit_reason(code, output)
        wait = waits.next("failed")
        if refused:  # the held session lapses within a minute: try again at a steady pace meanwhile
            reason = f"{reason} (the SuperLink still holds the session of the SuperNode that died)"
            wait = min(wait, STALE_RETRY_S)
        changes = {"last_exit_code": code, "last_flower_code": flower_code, "last_error": reason}
        self._set(state="restarting", node_id=None, pid=None, **changes)
        log.warning(
            "%s of %s exited with %s (%s); restarting in %.0f s (see %s)",
            SUPERNODE, self.device_id, code, reason, wait, self.log_path,
        )  # fmt: skip
        return wait

    def _find_superlink(self) -> FederationInfo | Literal["disabled", "unknown"]:
        """The SuperLink to join, else why not (state waiting-for-superlink, logged once per reason)."""
        try:
            return self._locate()
        except FederationUnavailableError as exc:
            self._set(state="waiting-for-superlink", last_error=str(exc))
            self._say("disabled", logging.INFO, "%s; asking again every %.0f s", exc, self._backoff.disabled_s)
            return "disabled"
        except (AgentError, OSError) as exc:
            self._set(state="waiting-for-superlink", last_error=str(exc))
            self._say(f"locate:{exc}", logging.WARNING, "cannot locate the SuperLink (retrying): %s", exc)
            return "unknown"

    def _launch(self, info: FederationInfo) -> _Run:
        """Write the key and root certificate, then start the guard and the SuperNode under it."""
        self._refresh_key()
        root = self.directory / "root.pem"
        atomic_write_bytes(root, info.root_certificates.encode())
        home = self.directory / "flwr-home"
        home.mkdir(exist_ok=True)
        command = [
            str(self.supernode),
            "--superlink", info.superlink,
            "--root-certificates", str(root),
            "--auth-supernode-private-key", str(self.key_path),
            "--port", str(_free_port()),
            "--node-config", node_config(self._store_path, self.device_id),
        ]  # fmt: skip
        guard = [sys.executable, "-I", "-S", "-c", _GUARD, str(os.getpid()), str(self._backoff.stop_grace_s)]
        proc = subprocess.Popen(
            [*guard, *command],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            cwd=self.directory,
            env=_flower_env(self.supernode.parent, home),
            start_new_session=True,  # a process group of its own: stopped as one
        )
        if self._launches:
            self._set(restarts=self._status.restarts + 1)
        self._launches += 1
        self._run = _Run(proc, self._logfile or _LogFile(self.log_path), self._node_id)
        self._set(state="running", superlink=info.superlink, pid=proc.pid, node_id=None)
        self._said.clear()
        log.info("%s of %s started (pid %s), joining %s", SUPERNODE, self.device_id, proc.pid, info.superlink)
        return self._run

    def _watch(self, run: _Run) -> Literal["stopped", "exited", "key-changed"]:
        """Wait until the SuperNode exits, the agent stops, or the enrolment key changes; the group is gone after."""
        next_key_check = time.monotonic() + self._backoff.key_check_s
        outcome: Literal["stopped", "exited", "key-changed"] = "exited"
        while run.proc.poll() is None:
            if self._stop.wait(0.2):
                outcome = "stopped"
                break
            if time.monotonic() >= next_key_check:
                next_key_check = time.monotonic() + self._backoff.key_check_s
                if self._key_changed():
                    log.info("the enrolment key of %s changed: restarting its SuperNode with it", self.device_id)
                    outcome = "key-changed"
                    break
        if self._stop.is_set():  # stop() may have ended the guard already
            outcome = "stopped"
        if outcome != "exited":
            run.proc.send_signal(signal.SIGTERM)  # the guard: SIGTERM to the SuperNode, then SIGKILL to the group
            try:
                run.proc.wait(self._backoff.stop_grace_s + 2.0)
            except subprocess.TimeoutExpired:
                log.warning("the SuperNode guard of %s did not stop in time: killing its group", self.device_id)
        run.signal_group(signal.SIGKILL)  # whatever is left: the SuperExec, ClientApps, a stuck guard
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.proc.wait(5.0)
        self._run = None
        return outcome

    def _refused(self, info: FederationInfo, code: int, flower_code: int | None, output: str, wait: float) -> None:
        reason = (
            f"the SuperLink {info.superlink} refused this device's SuperNode ({_last_error_line(output)}): "
            f"its key is not registered (or was unregistered); register {self.key_path}.pub with "
            "`flwr supernode register`, or enrol the device again"
        )
        first = self._status.state != "refused"
        self._set(
            state="refused",
            last_exit_code=code,
            last_flower_code=flower_code,
            last_error=reason,
            node_id=None,
            pid=None,
        )
        log.warning("%s; trying again in %.0f s", reason, wait)
        if first and self._on_refused is not None:
            try:
                self._on_refused(reason)
            except Exception:  # reporting must not end the supervision
                log.exception("reporting the refused SuperNode of %s failed", self.device_id)

    # -- files and status ---------------------------------------------------------------------------------

    def _refresh_key(self) -> bool:
        """Write node_key / node_key.pub from the enrolment key when they differ; True when they did."""
        private, public = node_key_openssh(self._key_path())
        public_path = self.key_path.with_name("node_key.pub")
        # Compared by the public key: the OpenSSH private form carries a random check value, new every time.
        if self.key_path.exists() and public_path.exists() and public_path.read_bytes() == public:
            return False
        atomic_write_bytes(self.key_path, private)  # a temp file made 0600, renamed
        os.chmod(self.key_path, 0o600)
        atomic_write_bytes(public_path, public)
        return True

    def _key_changed(self) -> bool:
        try:
            return self._refresh_key()
        except (ConfigError, OSError) as exc:
            self._say(f"key:{exc}", logging.WARNING, "cannot refresh the SuperNode key: %s", exc)
            return False

    def _node_id(self, node_id: str) -> None:
        self._set(node_id=node_id)
        log.info("SuperNode of %s joined as node %s", self.device_id, node_id)

    def _set(self, **changes: object) -> None:
        with self._lock:
            self._status = replace(self._status, **changes)  # type: ignore[arg-type]

    def _say(self, key: str, level: int, message: str, *args: object) -> None:
        """Log a condition once until something else happened (the waits repeat it otherwise)."""
        if key in self._said:
            return
        self._said = {key}
        log.log(level, message, *args)


def _flower_env(bin_dir: Path, home: Path) -> dict[str, str]:
    """The SuperNode's environment: its own FLWR_HOME, no telemetry or update checks, the venv's bin first
    (it starts `flower-superexec` and `flwr-clientapp` by name), and none of the agent's Python settings."""
    env = {k: v for k, v in os.environ.items() if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}
    env.update(
        FLWR_HOME=str(home),
        FLWR_TELEMETRY_ENABLED="0",
        FLWR_DISABLE_UPDATE_CHECK="1",
        PATH=os.pathsep.join([str(bin_dir), env.get("PATH", os.defpath)]),
    )
    return env


def _flower_code(output: str) -> int | None:
    """Flower's own exit code in its last output (`Exit Code: 305`), if it logged one."""
    codes = _FLOWER_CODE.findall(output)
    return int(codes[-1]) if codes else None


def _exit_reason(code: int, output: str) -> str:
    """Why the SuperNode (under its guard, which reports a signal as 128 + its number) exited."""
    if code > 128:
        with contextlib.suppress(ValueError):
            return f"killed by {signal.Signals(code - 128).name}"
    return _last_error_line(output) or f"exit status {code}, no output"


def _last_error_line(output: str) -> str:
    """The most telling line of the SuperNode's last output (its error), for logs and the status."""
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    for line in reversed(lines):
        if "[code:" in line or "ERROR" in line or "Exit Code" in line:
            return line[:300]
    return lines[-1][:300] if lines else ""
