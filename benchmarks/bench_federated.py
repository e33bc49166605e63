"""Federated retraining on Flower 1.42: round overhead, accuracy against centralized training, memory per device.

Everything runs on 127.0.0.1: an insecure `flower-superlink` and real `flower-supernode` processes from the Flower
venv (`.venv-flower`), each in its own process group under a temporary directory, all killed at the end (also on
Ctrl-C or an error). Figures are printed on stdout as tables (`--json PATH` also writes them as JSON); progress goes
to stderr. In one run:

1. overhead: seconds per round (train + evaluate phase, from the ServerApps' own phase timings) of edgefleet's
   Flower App (`federated/flowerapp`: node-ids restriction, sample stores, progress and result files) against a
   plain Flower App (`benchmarks/_federated_plain`: Message-API FedAvg, numpy data, nothing else) on the same
   SuperLink and SuperNodes, the same CNN, initial weights, data, epochs, lr and batch size; runs interleaved.
   `--full-stack` adds a third row: the whole coordinator path (`edgefleet up --federated` with TLS and node
   authentication, agents of `simulators.SimulatedFleet` with their own SuperNodes and sample stores filled through
   their endpoints, `edgefleet federated run`).
2. accuracy: the reference CNN's architecture (untrained, seeded) trained federatedly by edgefleet's app with FedAvg
   on sklearn's digits split over `--clients` SuperNodes by a seeded Dirichlet(alpha) label split, against the same
   network trained centrally (same code, optimizer, lr, batch size) on the union of the clients' training rows for
   rounds x local-epochs epochs, both scored on the same held-out digits (never on any device). Settings are
   previewed first by FedAvg in this process (`--simulate`: the ClientApp's own training code, no Flower); with
   SGD and one local epoch, 20 rounds on ~130 rows per client stay near chance while centralized training reaches
   ~96 %, so the default Flower run uses Adam, lr 0.005, 10 local epochs (within 1 point in the preview).
3. memory: resident memory (VmRSS) of each SuperNode with every descendant (its SuperExec and the ClientApp of the
   message in flight), sampled every 0.2 s; peak per device during rounds with its split, and idle between runs;
   then the same for the Flower-side options (`--memory-options`): `process-isolation` (`--isolation process` and
   a long-lived `flower-superexec` started beside the SuperNode), `malloc-arena-2` (MALLOC_ARENA_MAX=2,
   OMP_NUM_THREADS=1 for every process of the device) and `lean-entry-points` (`flower-superexec` and
   `flwr-clientapp` scripts first on the SuperNode's PATH that import only their own module, not their whole CLI
   package). What the Flower source offers: /tmp/fl/bench-notes.md.

Expected duration with the defaults on 2 cores: 35-45 minutes (overhead ~8, in-process previews ~3-6, the
20-round run on 10 SuperNodes 15-25, memory options ~4); `--full-stack` adds ~3. Measured on 2026-11-30 with other
test runs sharing the cores (load average up to 28): 55 minutes, 36 of them for the 20-round run.
Quick check (~5 minutes):
`--nodes 2 --overhead-rounds 1 --repeats 1 --clients 3 --rounds 2 --no-simulate --memory-options none`.

    .venv/bin/python benchmarks/bench_federated.py [--nodes 3] [--rounds 20] [--skip-accuracy] [--json out.json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression.reference import load_digits_split  # noqa: E402
from federated.flowerapp.edgefleet_fl.store import held_out  # noqa: E402
from simulators.brokers import free_port  # noqa: E402
from tests.federated.flower import make_run_dir, write_store  # noqa: E402

PLAIN_APP = ROOT / "benchmarks" / "_federated_plain"
MODEL = "digits-cnn"
INPUT_SHAPE = (1, 8, 8)
MIN_SAMPLES = 10  # the run config's min-samples; every client gets more than this
_STARTED = time.monotonic()


def log(message: str) -> None:
    """A progress line on stderr."""
    print(f"[{time.monotonic() - _STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


# -- processes -----------------------------------------------------------------------------------------------------


def _proc_table() -> dict[int, tuple[int, str]]:
    """pid → (parent pid, state letter) of every process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        table[int(entry)] = (int(fields[1]), fields[0])
    return table


_CMDLINES: dict[int, str] = {}


def cmdline(pid: int) -> str:
    """The process's command line (cached: the benchmark's processes keep theirs)."""
    if pid not in _CMDLINES:
        try:
            _CMDLINES[pid] = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            return ""
    return _CMDLINES[pid]


def family(roots: Iterable[int], table: Mapping[int, tuple[int, str]] | None = None) -> set[int]:
    """`roots` and every live descendant: by parent links, and by Flower's `--parent-pid N` for re-parented ones."""
    table = table if table is not None else _proc_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _state) in table.items():
        children.setdefault(ppid, []).append(pid)
    found = {r for r in roots if r in table}
    while True:
        todo = list(found)
        grown = set(found)
        while todo:
            for child in children.get(todo.pop(), []):
                if child not in grown:
                    grown.add(child)
                    todo.append(child)
        for pid in table:
            if pid not in grown and "--parent-pid" in (text := cmdline(pid)):
                words = text.split()
                with suppress(ValueError, IndexError):
                    if int(words[words.index("--parent-pid") + 1]) in grown:
                        grown.add(pid)
        if grown == found:
            return found
        found = grown


def rss_kib(pid: int) -> int:
    """VmRSS of a process in KiB (0 for a zombie or a process that is gone)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


class Processes:
    """Every process the benchmark starts: own session (process group) each; all of them and their descendants
    are killed by `shutdown`, which runs at the end whatever happens."""

    def __init__(self) -> None:
        self.started: list[subprocess.Popen[bytes]] = []
        self._lock = threading.Lock()

    def spawn(self, args: Sequence[str], *, env: Mapping[str, str], log_path: Path) -> subprocess.Popen[bytes]:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as out:
            process = subprocess.Popen(
                list(args), env=dict(env), stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        with self._lock:
            self.started.append(process)
        return process

    def stop(self, processes: Sequence[subprocess.Popen[bytes]], grace: float = 8.0) -> None:
        """SIGTERM to each group (and every descendant), SIGKILL after `grace` s to whatever is left."""
        members = family([p.pid for p in processes])
        for process in processes:
            if process.poll() is None:
                with suppress(ProcessLookupError, PermissionError):
                    os.killpg(process.pid, signal.SIGTERM)
        for pid in members:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for process in processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
        left = {pid for pid in members | family([p.pid for p in processes]) if _alive(pid)}
        for process in processes:
            with suppress(ProcessLookupError, PermissionError):
                os.killpg(process.pid, signal.SIGKILL)
        for pid in left:
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)
        for process in processes:
            with suppress(subprocess.TimeoutExpired):
                process.wait(timeout=10)
        with self._lock:
            self.started = [p for p in self.started if p not in processes]
        _reap_orphans()

    def shutdown(self) -> None:
        with self._lock:
            everything = list(self.started)
        if everything:
            self.stop(everything, grace=5.0)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


def _become_subreaper() -> None:
    """Orphaned descendants (a SuperExec whose SuperNode died) come back to this process, which reaps them."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def _kill_descendants() -> None:
    """Last resort: SIGKILL anything still running that descends from this process (agents' SuperNodes, a
    coordinator's children), so that nothing the benchmark started outlives it."""
    me = os.getpid()
    for pid in family([me]) - {me}:
        if _alive(pid):
            with suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)


def _reap_orphans() -> None:
    """Reap zombies that were re-parented to us (never one of our own Popen children: those are waited for)."""
    table = _proc_table()
    me = os.getpid()
    for pid, (ppid, state) in table.items():
        if ppid == me and state == "Z":
            with suppress(ChildProcessError, OSError):
                os.waitpid(pid, os.WNOHANG)


# -- memory ------------------------------------------------------------------------------------------------------


def role(pid: int) -> str:
    text = cmdline(pid)
    for name, key in (
        ("clientapp", "flwr-clientapp"),
        ("superexec", "flower-superexec"),
        ("supernode", "flower-supernode"),
        ("serverapp", "flwr-serverapp"),
        ("superlink", "flower-superlink"),
    ):
        if key in text:
            return name
    return "other"


ROLES = ("supernode", "superexec", "clientapp", "other")


class MemorySampler(threading.Thread):
    """Samples VmRSS of each device's process family every `interval` s, under the current label.

    A sample keeps, per device and role, the RSS of each process (KiB). Two ClientApp processes can be alive at
    once on a device (the one that answered is still exiting when the next message's starts), so a peak is given
    both as the largest sum seen (`max_device_mib`, with the number of ClientApps then alive) and as the footprint
    of one message: the largest SuperNode + SuperExec + single ClientApp process (`one_message_mib`).
    """

    def __init__(self, devices: Mapping[str, Sequence[int]], interval: float = 0.2) -> None:
        super().__init__(daemon=True, name="memory-sampler")
        self.devices = {name: list(pids) for name, pids in devices.items()}
        self.interval = interval
        self.label = "startup"
        self.samples: dict[str, list[dict[str, dict[str, list[int]]]]] = {}
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval):
            table = _proc_table()
            sample: dict[str, dict[str, list[int]]] = {}
            for device, roots in self.devices.items():
                split: dict[str, list[int]] = {}
                for pid in family(roots, table):
                    kib = rss_kib(pid)
                    if kib:
                        split.setdefault(role(pid), []).append(kib)
                sample[device] = split
            self.samples.setdefault(self.label, []).append(sample)

    def stop(self) -> None:
        self._halt.set()
        self.join(5)

    def peak(self, label: str) -> dict[str, Any]:
        """Per device: the largest total (MiB) with its split, and the one-message footprint; the worst device's."""
        samples = self.samples.get(label, [])
        per_device: list[dict[str, Any]] = []
        for device in self.devices:
            splits = [s.get(device, {}) for s in samples]
            best = max(splits, key=lambda sp: sum(map(sum, sp.values())), default={})
            single = {r: max((max(sp.get(r, [0])) for sp in splits), default=0) for r in ROLES}
            per_device.append(
                {
                    "device": device,
                    "total_mib": _mib(sum(map(sum, best.values()))),
                    "split_mib": {r: _mib(sum(best.get(r, []))) for r in ROLES},
                    "clientapps_at_peak": len(best.get("clientapp", [])),
                    "largest_process_mib": {r: _mib(v) for r, v in single.items()},
                    "one_message_mib": _mib(single["supernode"] + single["superexec"] + single["clientapp"]),
                }
            )
        top = max(per_device, key=lambda d: d["total_mib"], default={})
        one = max(per_device, key=lambda d: d["one_message_mib"], default={})
        return {
            "samples": len(samples),
            "max_device_mib": top.get("total_mib", 0.0),
            "max_device_split_mib": top.get("split_mib", {}),
            "clientapps_at_peak": top.get("clientapps_at_peak", 0),
            "median_device_mib": round(statistics.median(d["total_mib"] for d in per_device), 1) if per_device else 0,
            "one_message_mib": one.get("one_message_mib", 0.0),
            "one_message_split_mib": one.get("largest_process_mib", {}),
            "devices": per_device,
        }

    def idle(self, label: str) -> dict[str, Any]:
        """Median over the label's samples of each device's total (MiB) and split."""
        per_device = []
        for device in self.devices:
            splits = [s.get(device, {}) for s in self.samples.get(label, [])]
            if not splits:
                continue
            per_device.append(
                {
                    "device": device,
                    "total_mib": _mib(statistics.median(sum(map(sum, sp.values())) for sp in splits)),
                    "split_mib": {r: _mib(statistics.median(sum(sp.get(r, [])) for sp in splits)) for r in ROLES},
                }
            )
        totals = [d["total_mib"] for d in per_device]
        return {
            "samples": len(self.samples.get(label, [])),
            "median_device_mib": round(statistics.median(totals), 1) if totals else 0.0,
            "split_mib": per_device[0]["split_mib"] if per_device else {},
            "devices": per_device,
        }


def _mib(kib: float) -> float:
    return round(kib / 1024, 1)


# -- Flower deployment ---------------------------------------------------------------------------------------------


@dataclass
class Device:
    name: str
    supernode: subprocess.Popen[bytes]
    superexec: subprocess.Popen[bytes] | None = None  # only with --isolation process

    @property
    def roots(self) -> list[int]:
        return [self.supernode.pid] + ([self.superexec.pid] if self.superexec else [])


@dataclass
class Cluster:
    """An insecure SuperLink on a free port, SuperNodes, and the `flwr` CLI pointed at it (connection `local`)."""

    procs: Processes
    workdir: Path
    flower_bin: Path
    extra_env: Mapping[str, str] = field(default_factory=dict)
    path_prefix: Path | None = None  # a directory put first on the SuperNodes' PATH (lean entry points)
    port: int = 0
    superlink: subprocess.Popen[bytes] | None = None
    devices: list[Device] = field(default_factory=list)

    def env(self, home: Path, *, extra: bool = True) -> dict[str, str]:
        home.mkdir(parents=True, exist_ok=True)
        first = f"{self.path_prefix}{os.pathsep}" if extra and self.path_prefix else ""
        return {
            **os.environ,
            **(dict(self.extra_env) if extra else {}),
            "PATH": f"{first}{self.flower_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_HOME": str(home),
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
        }

    def flwr(self, *args: str, timeout: float = 120) -> Any:
        result = subprocess.run(
            [str(self.flower_bin / "flwr"), *args, "--format", "json"],
            env=self.env(self.workdir / "cli", extra=False),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        try:
            return json.loads(result.stdout)
        except ValueError:
            raise RuntimeError(
                f"flwr {' '.join(args)} -> {result.returncode}: {result.stdout}{result.stderr}"
            ) from None

    def start(self) -> None:
        self.port = free_port()
        self.superlink = self.procs.spawn(
            [
                str(self.flower_bin / "flower-superlink"),
                "--insecure",
                "--port",
                str(self.port),
                "--disable-runtime-dependency-installation",
            ],
            env=self.env(self.workdir / "superlink", extra=False),
            log_path=self.workdir / "superlink.log",
        )
        cli = self.workdir / "cli"
        cli.mkdir(parents=True, exist_ok=True)
        (cli / "config.toml").write_text(
            f'[superlink]\ndefault = "local"\n\n[superlink.local]\naddress = "127.0.0.1:{self.port}"\ninsecure = true\n'
        )
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            with suppress(RuntimeError, subprocess.TimeoutExpired):
                if self.flwr("supernode", "list", "local", timeout=30).get("success"):
                    return
            if self.superlink.poll() is not None:
                break
            time.sleep(0.5)
        raise RuntimeError(f"the SuperLink did not come up: {self.tail('superlink')}")

    def online(self) -> set[int]:
        body = self.flwr("supernode", "list", "local")
        return {int(n["node-id"]) for n in body.get("nodes", []) if n.get("status") == "online"}

    def add_nodes(self, node_configs: Sequence[Mapping[str, str]], *, isolation: str = "subprocess") -> list[int]:
        """Start one SuperNode per config (and, with isolation `process`, its own long-lived SuperExec); their
        node ids once the SuperLink lists them all online."""
        before = self.online()
        for i, config in enumerate(node_configs):
            name = f"node{len(self.devices)}"
            home = self.workdir / name
            port = free_port()
            text = " ".join(f'{k}="{v}"' for k, v in config.items())
            node = self.procs.spawn(
                [
                    str(self.flower_bin / "flower-supernode"),
                    "--insecure",
                    "--superlink",
                    f"127.0.0.1:{self.port}",
                    "--port",
                    str(port),
                    "--isolation",
                    isolation,
                    "--node-config",
                    text,
                ],
                env=self.env(home),
                log_path=self.workdir / f"{name}.log",
            )
            superexec = None
            if isolation == "process":
                superexec = self.procs.spawn(
                    [
                        str(self.flower_bin / "flower-superexec"),
                        "--insecure",
                        "--runtime-api-address",
                        f"127.0.0.1:{port}",
                    ],
                    env=self.env(home),
                    log_path=self.workdir / f"{name}-superexec.log",
                )
            self.devices.append(Device(name, node, superexec))
            del i
        deadline = time.monotonic() + 60 + 15 * len(node_configs)
        while time.monotonic() < deadline:
            new = self.online() - before
            if len(new) >= len(node_configs):
                return sorted(new)
            dead = [d.name for d in self.devices if d.supernode.poll() is not None]
            if dead:
                raise RuntimeError(f"SuperNode {dead[0]} exited: {self.tail(dead[0])}")
            time.sleep(1)
        raise RuntimeError(f"only {len(self.online() - before)} of {len(node_configs)} SuperNodes came online")

    def run(self, app_dir: Path, config: Mapping[str, Any]) -> int:
        toml = app_dir.parent / f"{app_dir.name}.run.toml"
        toml.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in config.items()))
        body = self.flwr("run", str(app_dir), "local", "--run-config", str(toml), timeout=300)
        if not body.get("success"):
            raise RuntimeError(f"flwr run refused {app_dir.name}: {body}")
        return int(body["run-id"])

    def wait(self, run_id: int, timeout: float) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            run = self.flwr("ls", "local", "--run-id", str(run_id))["runs"][0]
            if str(run["status"]).startswith("finished"):
                return dict(run)
            time.sleep(2)
        raise RuntimeError(f"run {run_id} did not finish within {timeout:.0f} s")

    def tail(self, name: str) -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else "(no log)"

    def stop(self) -> None:
        processes = [p for d in self.devices for p in (d.supernode, d.superexec) if p is not None]
        if self.superlink is not None:
            processes.append(self.superlink)
        self.procs.stop(processes)


def lean_entry_points(directory: Path, flower_bin: Path) -> Path:
    """`flower-superexec` and `flwr-clientapp` that load only their own module.

    Flower's console scripts import `flwr.supercore.cli` / `flwr.supernode.cli`, whose `__init__` imports every
    command of the package: a SuperExec, which only polls and launches processes, then loads the SuperLink's state
    code and SQLAlchemy, and every ClientApp process the whole SuperNode (uvicorn, SQLAlchemy). The SuperNode starts
    `flower-superexec` and the SuperExec starts `flwr-clientapp` by name from PATH, so these scripts, first on the
    SuperNode's PATH, replace them without touching Flower.
    """
    python = flower_bin / "python3"
    package = subprocess.run(
        [str(python), "-c", "import flwr, os; print(os.path.dirname(flwr.__file__))"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    directory.mkdir(parents=True, exist_ok=True)
    for command, module, function in (
        ("flwr-clientapp", "supernode/cli/flwr_clientapp.py", "flwr_clientapp"),
        ("flower-superexec", "supercore/cli/flower_superexec.py", "flower_superexec"),
    ):
        script = directory / command
        script.write_text(
            f"#!{python}\n"
            f'"""{command} without the eager imports of its CLI package (bench_federated.py)."""\n'
            "import importlib.util\nimport sys\n\n"
            f"spec = importlib.util.spec_from_file_location('_lean_{function}', {str(Path(package) / module)!r})\n"
            "module = importlib.util.module_from_spec(spec)\n"
            "spec.loader.exec_module(module)\n"
            f"sys.exit(module.{function}())\n"
        )
        script.chmod(0o755)
    return directory


# -- data and model ------------------------------------------------------------------------------------------------


@dataclass
class ClientData:
    prefix: str
    x: np.ndarray  # [n, 1, 8, 8] float32, in store order
    y: np.ndarray
    held: np.ndarray  # bool: held out for the per-round evaluation (edgefleet's hash rule)

    def npz(self, path: Path) -> Path:
        np.savez(
            path,
            x_train=self.x[~self.held],
            y_train=self.y[~self.held],
            x_eval=self.x[self.held],
            y_eval=self.y[self.held],
        )
        return path


def _held_mask(prefix: str, n: int, eval_fraction: float, batch: int = 4) -> np.ndarray:
    """Which rows edgefleet's ClientApp holds out: its hash of (request id, row), ids as `write_store` writes them."""
    return np.array([held_out(f"{prefix}-{i // batch}", i % batch, eval_fraction) for i in range(n)], dtype=bool)


def dirichlet_clients(
    x: np.ndarray, y: np.ndarray, clients: int, alpha: float, seed: int, eval_fraction: float, tag: str
) -> tuple[list[ClientData], int]:
    """A label split by Dirichlet(alpha) per class over `clients`, redrawn (same seeded generator) until every client
    has more than MIN_SAMPLES training rows and at least 2 held-out rows; (clients, draws it took)."""
    rng = np.random.default_rng(seed)
    for draw in range(1, 1001):
        parts: list[list[int]] = [[] for _ in range(clients)]
        for label in np.unique(y):
            ids = rng.permutation(np.flatnonzero(y == label))
            cuts = (np.cumsum(rng.dirichlet([alpha] * clients)) * len(ids)).astype(int)[:-1]
            for k, piece in enumerate(np.split(ids, cuts)):
                parts[k].extend(piece.tolist())
        result = []
        for k, ids in enumerate(parts):
            order = rng.permutation(np.asarray(ids, dtype=np.int64))
            prefix = f"{tag}{k}"
            held = _held_mask(prefix, len(order), eval_fraction)
            result.append(ClientData(prefix, x[order].reshape(-1, *INPUT_SHAPE), y[order], held))
        if all((~c.held).sum() > MIN_SAMPLES and c.held.sum() >= 2 for c in result):
            return result, draw
    raise RuntimeError(f"no Dirichlet({alpha}) split of {len(y)} rows over {clients} clients gives each enough rows")


def initial_program(path: Path, seed: int) -> tuple[bytes, dict[str, np.ndarray]]:
    """The reference CNN's architecture, untrained (seeded), as a trainable form; (its .pt2 bytes, its weights)."""
    import torch

    from compression.cnn import _make_network
    from compression.trainable import export_trainable

    torch.manual_seed(seed)
    model = _make_network()
    model.eval()
    export_trainable(model, torch.zeros(2, *INPUT_SHAPE), path)
    weights = {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}
    return path.read_bytes(), weights


def accuracy_of(program: bytes, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> float:
    from federated.flowerapp.edgefleet_fl.program import load_program
    from federated.flowerapp.edgefleet_fl.training import evaluate, load_arrays

    module, _shape = load_program(program)
    load_arrays(module, dict(weights))
    return evaluate(module, x.reshape(-1, *INPUT_SHAPE), y)[1]


def centralized(
    program: bytes, clients: Sequence[ClientData], epochs: int, lr: float, batch: int, optimizer: str
) -> tuple[dict[str, np.ndarray], float]:
    """The same module trained by the same code (edgefleet_fl.training.train) on the union of the clients' training
    rows for `epochs`; (weights, seconds)."""
    from federated.flowerapp.edgefleet_fl.program import load_program
    from federated.flowerapp.edgefleet_fl.training import TrainConfig, state_arrays, train

    module, _shape = load_program(program)
    x = np.concatenate([c.x[~c.held] for c in clients])
    y = np.concatenate([c.y[~c.held] for c in clients])
    started = time.perf_counter()
    train(module, x, y, TrainConfig(epochs=epochs, lr=lr, batch_size=batch, optimizer=optimizer, seed=0))
    return state_arrays(module), time.perf_counter() - started


def simulate_fedavg(
    program: bytes,
    init: Mapping[str, np.ndarray],
    clients: Sequence[ClientData],
    setting: Setting,
    rounds: int,
    batch: int,
) -> dict[str, np.ndarray]:
    """FedAvg in this process with the ClientApp's own training code (edgefleet_fl.training: same seeds, row order,
    optimizer, weighting by training rows) and no Flower: a cheap preview of what a setting gives."""
    from federated.flowerapp.edgefleet_fl.program import load_program
    from federated.flowerapp.edgefleet_fl.training import TrainConfig, load_arrays, state_arrays, train

    module, _shape = load_program(program)
    weights = dict(init)
    for server_round in range(1, rounds + 1):
        updates, counts = [], []
        for c in clients:
            load_arrays(module, weights)
            config = TrainConfig(
                epochs=setting.local_epochs,
                lr=setting.lr,
                batch_size=batch,
                optimizer=setting.optimizer,
                seed=server_round,
            )
            train(module, c.x[~c.held], c.y[~c.held], config)
            updates.append(state_arrays(module))
            counts.append(int((~c.held).sum()))
        total = sum(counts)
        weights = {
            k: (sum(u[k].astype(np.float64) * n for u, n in zip(updates, counts, strict=True)) / total).astype(
                np.float32
            )
            for k in weights
        }
    return weights


# -- runs ----------------------------------------------------------------------------------------------------------


@dataclass
class Setting:
    """One federated training setting (`--setting optimizer=adam,lr=0.001,local-epochs=2`)."""

    optimizer: str
    lr: float
    local_epochs: int

    @classmethod
    def parse(cls, text: str, default: Setting) -> Setting:
        values = {"optimizer": default.optimizer, "lr": default.lr, "local-epochs": default.local_epochs}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep or key.strip() not in values:
                raise argparse.ArgumentTypeError(f"--setting takes optimizer=, lr=, local-epochs=; got {part!r}")
            values[key.strip()] = value.strip()
        optimizer = str(values["optimizer"])
        if optimizer not in ("sgd", "adam"):
            raise argparse.ArgumentTypeError(f"optimizer must be sgd or adam, got {optimizer!r}")
        return cls(optimizer, float(values["lr"]), int(values["local-epochs"]))

    def label(self) -> str:
        return f"{self.optimizer} lr={self.lr:g} E={self.local_epochs}"


DEFAULT = Setting("adam", 0.005, 10)  # the accuracy run's setting: the one found within 1 pp (see the docstring)
SIMULATED = (  # what was tried, previewed in process by default
    "optimizer=sgd,lr=0.05,local-epochs=1",
    "optimizer=sgd,lr=0.05,local-epochs=5",
    "optimizer=sgd,lr=0.1,local-epochs=10",
    "optimizer=adam,lr=0.005,local-epochs=5",
    "optimizer=adam,lr=0.005,local-epochs=10",
    "optimizer=adam,lr=0.01,local-epochs=10",
)


def ours_config(
    node_ids: Sequence[int], rounds: int, setting: Setting, batch: int, eval_fraction: float, result: Path
) -> dict[str, Any]:
    return {
        "model": MODEL,
        "node-ids": ",".join(str(n) for n in node_ids),
        "num-server-rounds": rounds,
        "strategy": "fedavg",
        "local-epochs": setting.local_epochs,
        "lr": setting.lr,
        "batch-size": batch,
        "optimizer": setting.optimizer,
        "min-nodes": len(node_ids),
        "round-timeout": 600.0,
        "min-samples": MIN_SAMPLES,
        "eval-fraction": eval_fraction,
        "result-dir": str(result),
    }


def plain_config(nodes: int, rounds: int, setting: Setting, batch: int, init: Path, result: Path) -> dict[str, Any]:
    return {
        "num-server-rounds": rounds,
        "local-epochs": setting.local_epochs,
        "lr": setting.lr,
        "batch-size": batch,
        "min-nodes": nodes,
        "round-timeout": 600.0,
        "init-path": str(init),
        "result-dir": str(result),
    }


def _finished(run: Mapping[str, Any], what: str) -> None:
    if run.get("status") != "finished:completed":
        raise RuntimeError(f"{what} ended {run.get('status')}: {run.get('status-details')}")


def _phases_ours(result: Path) -> list[dict[str, Any]]:
    lines = (result / "progress.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def _phases_plain(result: Path) -> list[dict[str, Any]]:
    return list(json.loads((result / "timings.json").read_text())["phases"])


def round_figures(phases: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Seconds per round (train + evaluate), per phase, and the ClientApps' own mean timings per phase."""
    rounds = sorted({int(p["round"]) for p in phases})
    per_round = [sum(float(p["seconds"]) for p in phases if int(p["round"]) == r) for r in rounds]

    def phase_mean(name: str) -> float:
        values = [float(p["seconds"]) for p in phases if p["phase"] == name]
        return round(statistics.mean(values), 2) if values else 0.0

    def metric(name: str, key: str) -> float | None:
        values = [float(p["metrics"][key]) for p in phases if p["phase"] == name and key in (p.get("metrics") or {})]
        return round(statistics.mean(values), 2) if values else None

    return {
        "rounds": len(rounds),
        "seconds_per_round": round(statistics.mean(per_round), 2) if per_round else 0.0,
        "per_round": [round(s, 2) for s in per_round],
        "train_s": phase_mean("train"),
        "evaluate_s": phase_mean("evaluate"),
        "client_process_start_s": metric("train", "time-process-start-s"),
        "client_load_s": metric("train", "time-load-s"),
        "client_train_s": metric("train", "time-train-s"),
        "eval_acc_last": _last_eval(phases),
    }


def _last_eval(phases: Sequence[Mapping[str, Any]]) -> float | None:
    evals = [p for p in phases if p["phase"] == "evaluate" and "eval_acc" in (p.get("metrics") or {})]
    return round(float(evals[-1]["metrics"]["eval_acc"]), 4) if evals else None


# -- the three measurements ------------------------------------------------------------------------------------------


@dataclass
class Bench:
    args: argparse.Namespace
    work: Path
    procs: Processes
    program: bytes = b""
    init_weights: dict[str, np.ndarray] = field(default_factory=dict)
    result: dict[str, Any] = field(default_factory=dict)
    _runs: int = 0

    def prepare(self) -> None:
        log("building the initial model (the reference CNN's architecture, untrained, seeded) ...")
        self.program, self.init_weights = initial_program(self.work / "init.trainable.pt2", self.args.seed)
        np.savez(self.work / "init.npz", **self.init_weights)
        self.split = load_digits_split(seed=self.args.seed)

    def app_dir(self, kind: str) -> tuple[Path, Path]:
        """A fresh copy of the app to `flwr run`, and a fresh result directory."""
        self._runs += 1
        target = self.work / "runs" / f"{self._runs:02d}-{kind}"
        if kind == "ours":
            app = make_run_dir(target / "app", self.program)
        else:
            app = target / "app"
            shutil.copytree(PLAIN_APP, app, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        return app, target / "result"

    def cluster(
        self, name: str, extra_env: Mapping[str, str] | None = None, path_prefix: Path | None = None
    ) -> Cluster:
        cluster = Cluster(self.procs, self.work / name, self.args.flower_bin, dict(extra_env or {}), path_prefix)
        cluster.start()
        return cluster

    def stores(self, clients: Sequence[ClientData], where: Path) -> list[dict[str, str]]:
        """Each client's sample store (and .npz for the plain app); the SuperNodes' node configs."""
        configs = []
        for c in clients:
            store = write_store(where / c.prefix / "samples.sqlite3", MODEL, c.x, c.y, prefix=c.prefix)
            configs.append(
                {
                    "sample-store": str(store),
                    "device-id": c.prefix,
                    "data-path": str(c.npz(where / c.prefix / "data.npz")),
                }
            )
        return configs

    def run_app(
        self,
        cluster: Cluster,
        kind: str,
        node_ids: Sequence[int],
        rounds: int,
        setting: Setting,
        sampler: Any = None,
        *,
        label: str | None = None,
    ) -> dict[str, Any]:
        app, result = self.app_dir(kind)
        if kind == "ours":
            config = ours_config(node_ids, rounds, setting, self.args.batch_size, self.args.eval_fraction, result)
        else:
            config = plain_config(len(node_ids), rounds, setting, self.args.batch_size, self.work / "init.npz", result)
        if sampler is not None:
            sampler.label = label or kind
        started = time.monotonic()
        run_id = cluster.run(app, config)
        run = cluster.wait(run_id, timeout=900 + 600 * rounds)
        wall = time.monotonic() - started
        if sampler is not None:
            sampler.label = "idle"
        _finished(run, f"the {kind} app's run {run_id}")
        phases = _phases_ours(result) if kind == "ours" else _phases_plain(result)
        figures = round_figures(phases)
        figures["run_wall_s"] = round(wall, 1)
        figures["result_dir"] = str(result)
        return figures

    # 1 ----------------------------------------------------------------------------------------------------------

    def overhead(self) -> None:
        a = self.args
        clients, _ = dirichlet_clients(
            self.split.x_train, self.split.y_train, a.nodes, a.alpha, a.seed, a.eval_fraction, "o"
        )
        log(f"overhead: SuperLink + {a.nodes} SuperNodes; {a.repeats} x (plain, ours) runs, {a.overhead_rounds} rounds")
        cluster = self.cluster("overhead")
        try:
            node_ids = cluster.add_nodes(self.stores(clients, self.work / "overhead-data"))
            sampler = MemorySampler({d.name: d.roots for d in cluster.devices})
            sampler.label = "idle"
            sampler.start()
            time.sleep(a.idle_seconds)
            runs: dict[str, list[dict[str, Any]]] = {"plain": [], "ours": []}
            setting = a.overhead_setting
            if a.warmup:
                for kind in ("plain", "ours"):
                    log(f"overhead: warm-up run of the {kind} app (1 round, not counted) ...")
                    self.run_app(cluster, kind, node_ids, 1, setting, sampler, label="warmup")
            for rep in range(a.repeats):
                order = ("plain", "ours") if rep % 2 == 0 else ("ours", "plain")
                for kind in order:
                    log(f"overhead: {kind} app, repeat {rep + 1}/{a.repeats} ...")
                    figures = self.run_app(cluster, kind, node_ids, a.overhead_rounds, setting, sampler)
                    runs[kind].append(figures)
                    log(
                        f"overhead: {kind}: {figures['seconds_per_round']:.1f} s/round "
                        f"(train {figures['train_s']:.1f} s, evaluate {figures['evaluate_s']:.1f} s)"
                    )
                    time.sleep(a.idle_seconds)
            sampler.stop()
            self.result["overhead"] = {
                "nodes": a.nodes,
                "rounds": a.overhead_rounds,
                "repeats": a.repeats,
                "runs": runs,
                **{kind: _combine(rs) for kind, rs in runs.items()},
            }
            self.result["memory"] = {
                "during_plain": sampler.peak("plain"),
                "during_ours": sampler.peak("ours"),
                "idle": sampler.idle("idle"),
            }
        finally:
            cluster.stop()

    # 2 ----------------------------------------------------------------------------------------------------------

    def accuracy(self) -> None:
        a = self.args
        split = self.split
        clients, draws = dirichlet_clients(
            split.x_train, split.y_train, a.clients, a.alpha, a.seed, a.eval_fraction, "c"
        )
        sizes = [len(c.y) for c in clients]
        classes = [len(np.unique(c.y)) for c in clients]
        log(f"accuracy: Dirichlet({a.alpha}) split over {a.clients} clients (draw {draws}): rows {sizes}")
        main = Setting(a.optimizer, a.lr, a.local_epochs)
        flower = [main] + [Setting.parse(t, main) for t in a.setting]
        simulated = [Setting.parse(t, main) for t in a.simulate]
        test = (split.x_test, split.y_test)
        central: dict[str, tuple[int, float]] = {}

        def central_acc(setting: Setting) -> tuple[int, float]:
            if setting.label() not in central:
                epochs = a.rounds * setting.local_epochs
                weights, seconds = centralized(
                    self.program, clients, epochs, setting.lr, a.batch_size, setting.optimizer
                )
                acc = accuracy_of(self.program, weights, *test)
                log(f"accuracy: centralized {setting.label()}, {epochs} epochs: {acc * 100:.2f} % ({seconds:.0f} s)")
                central[setting.label()] = (epochs, acc)
            return central[setting.label()]

        rows: list[dict[str, Any]] = []
        for setting in simulated:
            epochs, c_acc = central_acc(setting)
            started = time.perf_counter()
            weights = simulate_fedavg(self.program, self.init_weights, clients, setting, a.rounds, a.batch_size)
            acc = accuracy_of(self.program, weights, *test)
            log(
                f"accuracy: in-process FedAvg {setting.label()}: {acc * 100:.2f} % vs centralized "
                f"{c_acc * 100:.2f} % ({time.perf_counter() - started:.0f} s)"
            )
            rows.append(
                {
                    "setting": setting.label(),
                    "how": "in-process FedAvg (same training code, no Flower)",
                    "federated_acc": round(acc, 4),
                    "centralized_epochs": epochs,
                    "centralized_acc": round(c_acc, 4),
                    "gap_pp": round((c_acc - acc) * 100, 2),
                }
            )
        for setting in flower:
            central_acc(setting)
        initial_acc = accuracy_of(self.program, self.init_weights, *test)
        cluster = self.cluster("accuracy")
        try:
            node_ids = cluster.add_nodes(self.stores(clients, self.work / "accuracy-data"))
            for setting in flower:
                log(f"accuracy: edgefleet app, {setting.label()}, {a.rounds} rounds on {a.clients} SuperNodes ...")
                figures = self.run_app(cluster, "ours", node_ids, a.rounds, setting)
                with np.load(Path(figures["result_dir"]) / "final.npz") as final:
                    weights = {k: final[k] for k in final.files}
                acc = accuracy_of(self.program, weights, *test)
                epochs, c_acc = central_acc(setting)
                rows.append(
                    {
                        "setting": setting.label(),
                        "how": "Flower: edgefleet flowerapp on real SuperNodes",
                        "federated_acc": round(acc, 4),
                        "centralized_epochs": epochs,
                        "centralized_acc": round(c_acc, 4),
                        "gap_pp": round((c_acc - acc) * 100, 2),
                        "seconds_per_round": figures["seconds_per_round"],
                        "run_wall_s": figures["run_wall_s"],
                        "last_round_eval_acc_on_devices": figures["eval_acc_last"],
                    }
                )
                log(f"accuracy: federated {setting.label()}: {acc * 100:.2f} % (gap {rows[-1]['gap_pp']:+.2f} pp)")
        finally:
            cluster.stop()
        self.result["accuracy"] = {
            "clients": a.clients,
            "alpha": a.alpha,
            "rounds": a.rounds,
            "rows_per_client": sizes,
            "classes_per_client": classes,
            "dirichlet_draws": draws,
            "test_rows": len(split.y_test),
            "initial_acc": round(initial_acc, 4),
            "settings": rows,
        }

    # 3 ----------------------------------------------------------------------------------------------------------

    def memory_options(self) -> None:
        a = self.args
        options: dict[str, tuple[str, dict[str, str], bool]] = {  # isolation, extra env, lean entry points
            "default": ("subprocess", {}, False),
            "process-isolation": ("process", {}, False),
            "malloc-arena-2": ("subprocess", {"MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1"}, False),
            "lean-entry-points": ("subprocess", {}, True),
        }
        chosen = [o for o in a.memory_options.split(",") if o and o != "none"]
        unknown = [o for o in chosen if o not in options]
        if unknown:
            raise SystemExit(f"--memory-options: unknown {unknown}; known: {', '.join(options)}")
        if not chosen:
            return
        clients, _ = dirichlet_clients(
            self.split.x_train, self.split.y_train, a.memory_nodes, a.alpha, a.seed, a.eval_fraction, "m"
        )
        found: dict[str, Any] = {}
        for option in chosen:
            isolation, env, lean = options[option]
            log(f"memory: option {option} ({a.memory_nodes} SuperNodes, {a.memory_rounds} round(s) of our app) ...")
            shims = lean_entry_points(self.work / "lean-bin", a.flower_bin) if lean else None
            cluster = self.cluster(f"memory-{option}", env, shims)
            try:
                node_ids = cluster.add_nodes(
                    self.stores(clients, self.work / f"memory-{option}-data"), isolation=isolation
                )
                sampler = MemorySampler({d.name: d.roots for d in cluster.devices})
                sampler.label = "idle"
                sampler.start()
                time.sleep(a.idle_seconds)
                figures = self.run_app(cluster, "ours", node_ids, a.memory_rounds, a.overhead_setting, sampler)
                time.sleep(a.idle_seconds)
                sampler.stop()
                found[option] = {
                    "isolation": isolation,
                    "env": env,
                    "lean_entry_points": lean,
                    "peak": sampler.peak("ours"),
                    "idle": sampler.idle("idle"),
                    "seconds_per_round": figures["seconds_per_round"],
                }
                log(
                    f"memory: {option}: peak {found[option]['peak']['max_device_mib']} MiB per device, "
                    f"idle {found[option]['idle']['median_device_mib']} MiB"
                )
            finally:
                cluster.stop()
        self.result["memory_options"] = found

    # (c) ----------------------------------------------------------------------------------------------------------

    def full_stack(self) -> None:
        a = self.args
        clients, _ = dirichlet_clients(
            self.split.x_train, self.split.y_train, a.nodes, a.alpha, a.seed, a.eval_fraction, "f"
        )
        setting = a.overhead_setting
        if setting.optimizer != "sgd":
            log("full stack: the coordinator's API has no optimizer field; its run trains with sgd")
        log(f"full stack: edgefleet up --federated, {a.nodes} simulated agents, {a.overhead_rounds} rounds ...")
        self.result["full_stack"] = full_stack_run(self, clients, setting)


def _edgefleet(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    command = [str(Path(sys.executable).parent / "edgefleet"), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"edgefleet {' '.join(args[:2])} exited {result.returncode}: {result.stderr[-1500:]}")
    return result


def _until(condition: Callable[[], bool], what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.5)


def full_stack_run(bench: Bench, clients: Sequence[ClientData], setting: Setting) -> dict[str, Any]:
    """(c): the coordinator path end to end; seconds per round from the run's progress.jsonl."""
    import torch

    from compression.cnn import _make_network, export_onnx
    from simulators import CoordinatorProcess, FleetConfig, SimulatedFleet, send_labelled_traffic

    a = bench.args
    work = bench.work / "full-stack"
    work.mkdir(parents=True)
    torch.manual_seed(a.seed)
    model = _make_network()
    model.load_state_dict({k: torch.from_numpy(v) for k, v in bench.init_weights.items()})
    model.eval()
    onnx = export_onnx(model, work / "digits-cnn.onnx")
    (work / "digits-cnn.trainable.pt2").write_bytes(bench.program)
    coordinator = CoordinatorProcess(work / "coordinator", topic_base="bench/federated/v1", federated=True)
    api = coordinator.start()
    family_pids: set[int] = set()
    try:
        _edgefleet(
            "models", "push", str(onnx), "--name", MODEL, "--version", "1.0.0",
            "--trainable", str(work / "digits-cnn.trainable.pt2"), "--url", api.url, "--token", str(api.token),
        )  # fmt: skip
        config = FleetConfig(
            devices=len(clients),
            data_root=work / "fleet",
            coordinator_url=api.url,
            api_token=api.token,
            topic_base="bench/federated/v1",
            id_prefix="flb",
            telemetry_interval_s=5.0,
            federated=True,
            flower_bin_dir=a.flower_bin,
            sample_rates={MODEL: 1.0},
        )
        with SimulatedFleet(config) as fleet:
            api.deploy(model=MODEL, version="1.0.0", tags={"fleet": "flb"})
            _until(
                lambda: all(ag.active_model and ag.active_model.version == "1.0.0" for ag in fleet.agents),
                "the agents to serve the parent",
                240,
            )
            _until(lambda: all(ag.federation_status.node_id for ag in fleet.agents), "every SuperNode admitted", 240)
            for agent, c in zip(fleet.agents, clients, strict=True):
                send_labelled_traffic(agent, c.x, c.y)
            guards = {ag.config.device_id: [ag.federation_status.pid or 0] for ag in fleet.agents}
            family_pids |= family([p for pids in guards.values() for p in pids])
            sampler = MemorySampler(guards)
            sampler.label = "idle"
            sampler.start()
            time.sleep(a.idle_seconds)
            sampler.label = "ours"
            started = time.monotonic()
            created = _edgefleet(
                "federated", "run", f"{MODEL}:1.0.0", "--to", "fleet=flb", "--rounds", str(a.overhead_rounds),
                "--min-nodes", str(len(clients)), "--local-epochs", str(setting.local_epochs), "--lr", str(setting.lr),
                "--batch-size", str(a.batch_size), "--round-timeout", "600", "--min-samples", str(MIN_SAMPLES),
                "--eval-fraction", str(a.eval_fraction), "--url", api.url, "--token", str(api.token), "--json",
            )  # fmt: skip
            run_id = int(json.loads(created.stdout)["id"])
            phases_wanted = 2 * a.overhead_rounds

            def done() -> bool:
                run = api.federated_run(run_id)
                if run["status"] in ("failed", "stopped"):
                    raise RuntimeError(f"federated run {run_id} {run['status']}: {run.get('error')}")
                return len(run.get("rounds") or []) >= phases_wanted

            _until(done, f"federated run {run_id}'s rounds", 900 + 600 * a.overhead_rounds)
            wall = time.monotonic() - started
            sampler.stop()
            run = api.federated_run(run_id)
            result = Path(run["params"]["result_dir"])
            figures = round_figures(_phases_ours(result))
            figures["run_wall_s"] = round(wall, 1)
            figures["memory_peak"] = sampler.peak("ours")
            figures["memory_idle"] = sampler.idle("idle")
            with suppress(Exception):  # it may be building its candidate: not part of the figure
                api.stop_federated_run(run_id)
            log(f"full stack: {figures['seconds_per_round']:.1f} s/round")
            family_pids |= family([p for pids in guards.values() for p in pids])
            return figures
    finally:
        if coordinator.proc is not None:
            family_pids |= family([coordinator.proc.pid])
        coordinator.stop()
        for pid in family_pids:
            if _alive(pid):
                with suppress(ProcessLookupError, PermissionError):
                    os.kill(pid, signal.SIGKILL)


def _combine(runs: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean over repeats of the per-run figures."""
    keys = ("seconds_per_round", "train_s", "evaluate_s", "client_process_start_s", "client_load_s", "client_train_s")
    out: dict[str, Any] = {}
    for key in (*keys, "run_wall_s"):
        values = [float(r[key]) for r in runs if r.get(key) is not None]
        out[key] = round(statistics.mean(values), 2) if values else None
    return out


# -- output --------------------------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".1f") -> str:
    return "—" if value is None else format(value, spec)


def _ratio(a: Any, b: Any) -> str:
    return "—" if not a or not b else f"{a / b:.2f}x"


def render(result: Mapping[str, Any]) -> str:
    out: list[str] = []
    if "full_stack" in result and "overhead" not in result:
        f = result["full_stack"]
        out.append(
            f"Full stack (no plain baseline run): {f['seconds_per_round']} s/round, run wall {f['run_wall_s']} s"
        )
        out.append("")
    if "overhead" in result:
        o = result["overhead"]
        plain, ours = o["plain"], o["ours"]
        out.append(
            f"Round overhead: FedAvg, {o['nodes']} SuperNodes, {o['rounds']} rounds x {o['repeats']} run(s) each, "
            "runs interleaved on one SuperLink"
        )
        out.append("")
        out.append(
            "| app | s/round | train phase s | evaluate phase s | ClientApp start→handler s | load s | train s "
            "| run wall s | s/round vs plain |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|")
        rows = [("plain Flower app", plain), ("edgefleet flowerapp", ours)]
        if "full_stack" in result:
            rows.append(("edgefleet full stack (TLS, auth, agents)", result["full_stack"]))
        for name, f in rows:
            out.append(
                f"| {name} | {_fmt(f.get('seconds_per_round'))} | {_fmt(f.get('train_s'))} | "
                f"{_fmt(f.get('evaluate_s'))} | {_fmt(f.get('client_process_start_s'), '.2f')} | "
                f"{_fmt(f.get('client_load_s'), '.2f')} | {_fmt(f.get('client_train_s'), '.2f')} | "
                f"{_fmt(f.get('run_wall_s'))} | {_ratio(f.get('seconds_per_round'), plain['seconds_per_round'])} |"
            )
        out.append("")
    if "accuracy" in result:
        acc = result["accuracy"]
        out.append(
            f"Accuracy: digits, Dirichlet alpha={acc['alpha']} over {acc['clients']} clients "
            f"(rows {min(acc['rows_per_client'])}-{max(acc['rows_per_client'])}), {acc['rounds']} rounds, "
            f"{acc['test_rows']} held-out digits; untrained start {acc['initial_acc'] * 100:.2f} %"
        )
        out.append("")
        out.append("| setting | how | federated (FedAvg) | centralized (same epochs) | gap pp | s/round |")
        out.append("|---|---|---|---|---|---|")
        for row in acc["settings"]:
            out.append(
                f"| {row['setting']} | {row['how']} | {row['federated_acc'] * 100:.2f} % | "
                f"{row['centralized_acc'] * 100:.2f} % ({row['centralized_epochs']} epochs) | "
                f"{row['gap_pp']:+.2f} | {_fmt(row.get('seconds_per_round'))} |"
            )
        out.append("")
    if "memory" in result:
        m = result["memory"]
        out.append("Resident memory per device (SuperNode + its SuperExec + ClientApps), MiB")
        out.append("")
        out.append(
            "| when | peak sum, worst device | supernode | superexec | clientapp(s) | ClientApps alive "
            "| one message (largest of each) | median device |"
        )
        out.append("|---|---|---|---|---|---|---|---|")
        out.append(
            f"| idle between runs (median) | {m['idle']['median_device_mib']} | "
            f"{m['idle']['split_mib'].get('supernode')} | {m['idle']['split_mib'].get('superexec')} | 0 | 0 | — | "
            f"{m['idle']['median_device_mib']} |"
        )
        rows = [("plain app round", m["during_plain"]), ("edgefleet app round", m["during_ours"])]
        if "full_stack" in result:
            rows.append(("full stack round (TLS, node auth)", result["full_stack"]["memory_peak"]))
        for label, f in rows:
            split = f["max_device_split_mib"]
            out.append(
                f"| {label} | {f['max_device_mib']} | {split.get('supernode')} | {split.get('superexec')} | "
                f"{split.get('clientapp')} | {f['clientapps_at_peak']} | {f['one_message_mib']} | "
                f"{f['median_device_mib']} |"
            )
        out.append("")
    if result.get("memory_options"):
        opts = result["memory_options"]
        out.append("Memory options (edgefleet app), MiB per device")
        out.append("")
        out.append(
            "| option | one message | supernode | superexec | clientapp | vs default | peak sum (ClientApps) "
            "| idle | vs default | s/round |"
        )
        out.append("|---|---|---|---|---|---|---|---|---|---|")
        base = opts.get("default", {})
        for name, f in opts.items():
            one = f["peak"]["one_message_split_mib"]
            out.append(
                f"| {name} | {f['peak']['one_message_mib']} | {one.get('supernode')} | {one.get('superexec')} | "
                f"{one.get('clientapp')} | "
                f"{_ratio(f['peak']['one_message_mib'], base.get('peak', {}).get('one_message_mib'))} | "
                f"{f['peak']['max_device_mib']} ({f['peak']['clientapps_at_peak']}) | "
                f"{f['idle']['median_device_mib']} | "
                f"{_ratio(f['idle']['median_device_mib'], base.get('idle', {}).get('median_device_mib'))} | "
                f"{_fmt(f['seconds_per_round'])} |"
            )
        out.append("")
    return "\n".join(out)


# -- main ----------------------------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_bin = Path(os.environ.get("EDGEFLEET_FLOWER_BIN_DIR") or ROOT / ".venv-flower" / "bin")
    size = parser.add_argument_group("sizes")
    size.add_argument("--nodes", type=int, default=3, help="SuperNodes of the overhead runs (default 3)")
    size.add_argument("--overhead-rounds", type=int, default=3, help="rounds of each overhead run (default 3)")
    size.add_argument("--repeats", type=int, default=2, help="overhead runs of each app, interleaved (default 2)")
    size.add_argument("--clients", type=int, default=10, help="SuperNodes of the accuracy run (default 10)")
    size.add_argument("--rounds", type=int, default=20, help="rounds of the accuracy run (default 20)")
    size.add_argument("--memory-nodes", type=int, default=2, help="SuperNodes per memory option (default 2)")
    size.add_argument("--memory-rounds", type=int, default=1, help="rounds per memory option (default 1)")
    size.add_argument("--idle-seconds", type=float, default=4.0, help="idle sampling before/between runs (default 4)")
    train = parser.add_argument_group(
        "training",
        "The accuracy run's setting is --optimizer/--lr/--local-epochs (its centralized baseline trains the same way "
        "for rounds x local-epochs epochs); the overhead and memory runs use --overhead-setting, the same for both "
        "apps. A setting is K=V,... with keys optimizer (sgd: momentum 0.9 | adam), lr, local-epochs.",
    )
    train.add_argument("--local-epochs", type=int, default=DEFAULT.local_epochs, help="default %(default)s")
    train.add_argument("--lr", type=float, default=DEFAULT.lr, help="default %(default)s")
    train.add_argument("--optimizer", choices=("sgd", "adam"), default=DEFAULT.optimizer, help="default %(default)s")
    train.add_argument("--batch-size", type=int, default=32, help="default %(default)s (every run)")
    train.add_argument(
        "--setting",
        action="append",
        default=[],
        metavar="K=V,...",
        help="another Flower accuracy run on the same SuperNodes, e.g. 'optimizer=sgd,lr=0.1' (repeatable; "
        "unnamed keys as the main setting; ~12 min each at the default sizes)",
    )
    train.add_argument(
        "--simulate",
        action="append",
        default=None,
        metavar="K=V,...",
        help="a setting previewed by in-process FedAvg (the ClientApp's training code, no Flower; ~1 min each); "
        f"repeatable; default: {' ; '.join(SIMULATED)}",
    )
    train.add_argument("--no-simulate", action="store_true", help="no in-process previews")
    train.add_argument(
        "--overhead-setting",
        default="optimizer=sgd,lr=0.05,local-epochs=1",
        metavar="K=V,...",
        help="setting of the overhead and memory runs (default %(default)s)",
    )
    train.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration of the label split")
    train.add_argument("--eval-fraction", type=float, default=0.2, help="rows each node holds out per round")
    train.add_argument("--seed", type=int, default=0)
    what = parser.add_argument_group("what to run")
    what.add_argument("--skip-overhead", action="store_true", help="skip 1 (and the memory figures taken with it)")
    what.add_argument("--skip-accuracy", action="store_true", help="skip 2")
    what.add_argument(
        "--memory-options",
        default="default,process-isolation,malloc-arena-2,lean-entry-points",
        help="comma-separated options to measure, or 'none' (default: %(default)s)",
    )
    what.add_argument("--full-stack", action="store_true", help="add the whole coordinator path as a third row of 1")
    out = parser.add_argument_group("output")
    out.add_argument("--json", type=Path, metavar="PATH", help="also write every figure as JSON to PATH")
    out.add_argument("--keep", action="store_true", help="keep the temporary directory (logs, stores, results)")
    parser.add_argument(
        "--flower-bin", type=Path, default=default_bin, help=f"Flower venv's bin (default {default_bin})"
    )
    what.add_argument("--no-warmup", dest="warmup", action="store_false", help="no uncounted 1-round run per app first")
    args = parser.parse_args(argv)
    try:
        main_setting = Setting(args.optimizer, args.lr, args.local_epochs)
        args.overhead_setting = Setting.parse(args.overhead_setting, Setting("sgd", 0.05, 1))
        for text in [*args.setting, *(args.simulate or [])]:
            Setting.parse(text, main_setting)
    except argparse.ArgumentTypeError as exc:
        parser.error(str(exc))
    args.simulate = [] if args.no_simulate else (args.simulate if args.simulate is not None else list(SIMULATED))
    if args.nodes < 1 or args.clients < 2 or args.memory_nodes < 1:
        parser.error("--nodes and --memory-nodes must be at least 1, --clients at least 2")
    if not (args.flower_bin / "flower-superlink").is_file():
        parser.error(f"no flower-superlink in {args.flower_bin} (make flower, or --flower-bin)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    _become_subreaper()
    procs = Processes()

    def on_signal(signum: int, _frame: Any) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    work = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    bench = Bench(args, work, procs)
    steps: list[tuple[str, Callable[[], None]]] = []
    if not args.skip_overhead:
        steps.append(("overhead", bench.overhead))
    if args.full_stack:
        steps.append(("full stack", bench.full_stack))
    if not args.skip_accuracy:
        steps.append(("accuracy", bench.accuracy))
    steps.append(("memory options", bench.memory_options))
    try:
        bench.prepare()
        for _name, step in steps:
            step()
    except KeyboardInterrupt:
        log("interrupted: stopping every process ...")
        return 130
    finally:
        procs.shutdown()
        _kill_descendants()
        _reap_orphans()
        if args.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    bench.result["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    bench.result["seconds"] = round(time.monotonic() - _STARTED, 1)
    print(render(bench.result))
    if args.json:
        args.json.write_text(json.dumps(bench.result, indent=2, default=str) + "\n")
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
