"""The coordinator's Flower SuperLink: up with `edgefleet up --federated`, over TLS of the fleet CA, restarted when it
dies with its registrations, and never left behind (a stopped or a killed coordinator takes it along).

Real processes: `edgefleet up` and the `flower-superlink` of the Flower venv (`make flower`), driven through
`FlowerControl` the way the coordinator drives it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from fastapi.testclient import TestClient

from cloud.app import create_app
from cloud.federation.flower import FlowerControl, FlowerError, FlowerRunStatus, flower_bin_dir, toml_value
from cloud.federation.superlink import SuperLinkStartError, check_superlink_port, resolve_superlink_port
from cloud.pki import FleetPki
from cloud.settings import Settings
from simulators import CoordinatorProcess
from tests.services import unavailable

pytestmark = pytest.mark.timeout(240)

GONE_WITHIN_S = 30.0  # a SuperLink stops in about a second; room for a loaded machine


# -- helpers shared with the node tests -------------------------------------------------------------------------


def flower_bin() -> Path:
    """The Flower venv's bin directory, or a skip (a failure under CI) when it has not been built."""
    try:
        return flower_bin_dir(None)
    except FlowerError as exc:
        unavailable(f"the Flower venv is missing: {exc}")
        raise  # unreachable: unavailable() skips or fails


def wait_until(check: Callable[[], object], timeout: float, what: str, interval: float = 0.3) -> None:
    """Poll `check` until it is truthy; fail naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(interval)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")


def alive(pid: int) -> bool:
    """True if `pid` runs (a zombie, dead but not reaped by this container's init, does not count)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rpartition(")")[2].split()[0] != "Z"


def _parents() -> dict[int, set[int]]:
    """pid → the pids it counts as parents: its ppid and, for Flower's helpers, the pid after `--parent-pid`."""
    parents: dict[int, set[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        linked = {int(stat.rpartition(")")[2].split()[1])}
        if b"--parent-pid" in args[:-1]:
            with contextlib.suppress(ValueError, IndexError):
                linked.add(int(args[args.index(b"--parent-pid") + 1]))
        parents[int(entry.name)] = linked
    return parents


def family(pid: int) -> set[int]:
    """`pid` and every process it started, directly or through Flower's `--parent-pid` links."""
    parents = _parents()
    found = {pid}
    grew = True
    while grew:
        more = {child for child, linked in parents.items() if linked & found} - found
        found |= more
        grew = bool(more)
    return found


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def superlink_pid(coordinator_pid: int) -> int | None:
    """The live flower-superlink the coordinator `coordinator_pid` runs."""
    for pid in family(coordinator_pid) - {coordinator_pid}:
        if "flower-superlink" in cmdline(pid) and alive(pid):
            return pid
    return None


def flower_processes(pids: set[int]) -> set[int]:
    """Those of `pids` that are live Flower processes."""
    return {p for p in pids if alive(p) and ("flower-" in cmdline(p) or "flwr-" in cmdline(p))}


def kill_all(pids: set[int]) -> None:
    """Leave nothing behind, whatever the test did."""
    for pid in pids:
        if alive(pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def control_for(location: dict[str, str], home: Path) -> FlowerControl:
    """A `flwr` control connecting as a device does: the route's address and CA."""
    home.mkdir(parents=True, exist_ok=True)
    ca = home / "superlink-ca.pem"
    ca.write_text(location["root_certificates"])
    return FlowerControl(bin_dir=flower_bin(), home=home, address=location["superlink"], root_certificates=ca)


def openssh_public(key: ec.EllipticCurvePrivateKey) -> str:
    return key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()


# -- a coordinator with a SuperLink -----------------------------------------------------------------------------


@pytest.fixture
def federated(tmp_path: Path) -> Iterator[CoordinatorProcess]:
    """`edgefleet up --federated` (SuperLink on a free port), stopped afterwards; no Flower process survives it."""
    flower_bin()
    process = CoordinatorProcess(tmp_path / "coordinator", federated=True)
    process.start()
    assert process.proc is not None
    seen = family(process.proc.pid)
    try:
        yield process
    finally:
        if process.proc.poll() is None:
            seen |= family(process.proc.pid)
        process.stop()
        kill_all(seen)


def location(process: CoordinatorProcess) -> dict[str, str]:
    response = httpx.get(f"{process.url}/api/v1/enrolment/federation", timeout=10)
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.mark.slow
def test_federated_coordinator_runs_a_superlink_over_tls_of_the_fleet_ca(
    federated: CoordinatorProcess, tmp_path: Path
) -> None:
    found = location(federated)
    pki = federated.data_dir / "pki"
    assert found["root_certificates"] == (pki / "ca.crt").read_text()
    host, _, port = found["superlink"].rpartition(":")
    assert host == "127.0.0.1" and int(port) > 0
    kept = (federated.data_dir / "federated" / "superlink.json").read_text()
    assert f'"port": {port}' in kept, "a free port was picked but not kept"

    control = control_for(found, tmp_path / "device-view")
    control.ping()
    assert control.nodes() == []
    cert = x509.load_pem_x509_certificate((pki / "superlink.crt").read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "127.0.0.1" in {str(ip) for ip in names.get_values_for_type(x509.IPAddress)}

    insecure = FlowerControl(
        bin_dir=flower_bin(), home=tmp_path / "plain", address=found["superlink"], root_certificates=None
    )
    with pytest.raises(FlowerError):
        insecure.ping(timeout_s=30)  # the SuperLink speaks TLS only


@pytest.mark.slow
def test_killed_superlink_is_restarted_and_keeps_its_registrations(
    federated: CoordinatorProcess, tmp_path: Path
) -> None:
    assert federated.proc is not None
    control = control_for(location(federated), tmp_path / "ctl")
    node_id = control.register_node(openssh_public(ec.generate_private_key(ec.SECP256R1())), name="probe")
    first = superlink_pid(federated.proc.pid)
    assert first is not None

    os.kill(first, signal.SIGKILL)
    coordinator_pid = federated.proc.pid
    wait_until(lambda: superlink_pid(coordinator_pid) not in (None, first), 60, "a new SuperLink")
    wait_until(lambda: _answers(control), 60, "the restarted SuperLink to answer")
    assert node_id in {str(n["node-id"]) for n in control.nodes()}, "the registration did not survive the restart"
    assert not alive(first)
    log = (federated.data_dir / "coordinator.log").read_text()
    assert "flower-superlink exited" in log and "restarting" in log


def _answers(control: FlowerControl) -> bool:
    try:
        control.ping(timeout_s=30)
    except FlowerError:
        return False
    return True


@pytest.mark.slow
def test_stopping_the_coordinator_stops_every_flower_process_it_started(federated: CoordinatorProcess) -> None:
    assert federated.proc is not None
    started = family(federated.proc.pid)
    flower = flower_processes(started)
    assert any("flower-superlink" in cmdline(p) for p in flower)
    assert any("flower-superexec" in cmdline(p) for p in flower), "the SuperLink's SuperExec was not seen"
    assert federated.stop() == 0
    wait_until(lambda: not flower_processes(flower), GONE_WITHIN_S, "every Flower process to stop")


@pytest.mark.slow
def test_killed_coordinator_takes_its_superlink_along(federated: CoordinatorProcess) -> None:
    assert federated.proc is not None
    flower = flower_processes(family(federated.proc.pid))
    assert flower
    federated.kill()  # SIGKILL: no shutdown code runs in the coordinator
    wait_until(lambda: not flower_processes(flower), GONE_WITHIN_S, "the SuperLink of a killed coordinator to stop")


TINY_APP = {
    "pyproject.toml": """
[build-system]
requires = ["hatchling"]
build-backend = "hatchling.build"

[project]
name = "tinyapp"
version = "0.1.0"
description = "a ServerApp that needs no SuperNode"
license = "Apache-2.0"
dependencies = ["flwr==1.42.0"]

[tool.hatch.build.targets.wheel]
packages = ["."]

[tool.flwr.app]
publisher = "edgefleet"

[tool.flwr.app.components]
serverapp = "tinyapp.server_app:app"
clientapp = "tinyapp.client_app:app"

[tool.flwr.app.config]
result-dir = ""
mode = "ok"
seconds = 0.0
""",
    "tinyapp/__init__.py": "",
    "tinyapp/server_app.py": """
import json
import time
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    config = dict(context.run_config)
    if config["mode"] == "fail":
        raise ValueError("asked to fail")
    time.sleep(float(config["seconds"]))
    Path(str(config["result-dir"]), "config.json").write_text(json.dumps(config))
""",
    "tinyapp/client_app.py": "from flwr.clientapp import ClientApp\n\napp = ClientApp()\n",
}


@pytest.mark.slow
def test_runs_are_started_watched_and_stopped_through_the_control(
    federated: CoordinatorProcess, tmp_path: Path
) -> None:
    app_dir = tmp_path / "tinyapp"
    for name, text in TINY_APP.items():
        (app_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (app_dir / name).write_text(text.lstrip())
    results = tmp_path / "results with spaces"
    results.mkdir()
    control = control_for(location(federated), tmp_path / "ctl")

    def finished(run_id: int) -> FlowerRunStatus:
        wait_until(lambda: control.run_status(run_id).finished, 120, f"run {run_id} to finish", 1)
        return control.run_status(run_id)

    done = finished(control.start_run(app_dir, {"result-dir": str(results), "mode": "ok", "seconds": 0.1}))
    assert done == FlowerRunStatus("finished:completed", "")
    written = (results / "config.json").read_text()
    assert '"result-dir": "' + str(results) + '"' in written and '"seconds": 0.1' in written

    failed = finished(control.start_run(app_dir, {"result-dir": str(results), "mode": "fail"}))
    assert failed.status == "finished:failed" and "asked to fail" in failed.details

    long = control.start_run(app_dir, {"result-dir": str(results), "seconds": 600.0})
    control.stop_run(long)
    assert finished(long).status == "finished:stopped"
    with pytest.raises(FlowerError, match=r"status of run 999 .*not found") as unknown:
        control.run_status(999)
    assert unknown.value.code is not None


@pytest.mark.slow
def test_busy_superlink_port_is_refused_in_one_line(tmp_path: Path) -> None:
    flower_bin()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            [str(Path(sys.executable).parent / "edgefleet"), "up", "--data-dir", str(tmp_path / "c"), "--port", "0",
             "--federated", "--superlink-port", str(port)],
            capture_output=True, text=True, timeout=120, check=False,
            env=dict(os.environ, EDGEFLEET_CONFIG=str(tmp_path / "cli.toml")),
        )  # fmt: skip
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if not line.startswith("ts=")]  # log lines aside
    assert len(errors) == 1 and errors[0].startswith("error: "), done.stderr
    assert f"127.0.0.1:{port}" in errors[0] and "superlink_port" in errors[0], errors[0]


# -- without a SuperLink process ----------------------------------------------------------------------------------


def test_federation_route_is_404_when_federated_learning_is_off(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "c", port=8080, device_mqtt_url="mqtts://broker.test:8883")
    with TestClient(create_app(settings, enable_mqtt=False)) as client:
        response = client.get("/api/v1/enrolment/federation")
    assert response.status_code == 404
    assert response.json()["detail"] == "federated learning is not enabled on this coordinator"


def test_port_zero_is_picked_once_and_kept(tmp_path: Path) -> None:
    state_dir = tmp_path / "federated"
    first = resolve_superlink_port(state_dir, "127.0.0.1", 0)
    assert resolve_superlink_port(state_dir, "127.0.0.1", 0) == first
    settings = Settings(data_dir=tmp_path, federated=True, superlink_port=0)
    check_superlink_port(settings)
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        squatter.bind(("127.0.0.1", first))
        squatter.listen()
        with pytest.raises(SuperLinkStartError, match=rf"127\.0\.0\.1:{first} .*superlink\.json"):
            resolve_superlink_port(state_dir, "127.0.0.1", 0)
        with pytest.raises(SuperLinkStartError, match="superlink_port"):
            check_superlink_port(settings)
    assert resolve_superlink_port(state_dir, "127.0.0.1", 0) == first


def test_superlink_certificate_names_the_hosts_devices_use(tmp_path: Path) -> None:
    pki = FleetPki(tmp_path / "pki", broker_hostnames=["broker.lan"]).ensure()
    cert_path, _ = pki.superlink_files(["fleet.example", "10.1.2.3"])
    cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    names = {*san.get_values_for_type(x509.DNSName), *(str(ip) for ip in san.get_values_for_type(x509.IPAddress))}
    assert {"fleet.example", "10.1.2.3", "broker.lan", "localhost", "127.0.0.1"} <= names
    before = cert_path.read_bytes()
    assert pki.superlink_files(["fleet.example"])[0].read_bytes() == before, "a covering certificate was reissued"
    pki.superlink_files(["other.example"])
    assert cert_path.read_bytes() != before, "a certificate missing a host name was kept"


def test_run_config_values_are_toml_literals() -> None:
    assert [toml_value(v) for v in ('a "b"', 3, 0.5, True)] == ['"a \\"b\\""', "3", "0.5", "true"]
    with pytest.raises(ValueError, match="finite"):
        toml_value(float("nan"))
