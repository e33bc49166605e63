"""The import rules of docs/architecture.md, enforced on the source tree.

1. Package directions: which project packages each package may import (the agent imports `protocol` only,
   so an agent-only install never loads compression/, torch or the coordinator).
2. Pure modules (decisions without IO: the rollout engine, the agent's update state machine, the variant
   policy) import no database, network, web or filesystem module, and no project module that does IO.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"protocol", "agent", "cloud", "compression", "federated", "simulators", "tests"}

# package -> project modules it may import (besides itself): a package name allows all of it,
# a dotted name only that module.
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "compression": {"protocol"},
    "agent": {"protocol"},
    "cloud": {"protocol"},
    # Federated runs hand the trained model to the registry through the one typed API client, like any push.
    "federated": {"protocol", "compression", "cloud.client"},
    # The simulators drive real agents and reach the coordinator through its one typed API client.
    "simulators": {"protocol", "agent", "compression", "cloud.client"},
}

PURE_MODULES = [
    "agent/update/machine.py",
    "cloud/variant_policy.py",
    "cloud/audit/chain.py",
    "cloud/rollouts/_base.py",
    "cloud/rollouts/_context.py",
    "cloud/rollouts/_devices.py",
    "cloud/rollouts/actions.py",
    "cloud/rollouts/decisions.py",
    "cloud/rollouts/engine.py",
    "cloud/rollouts/gates.py",
    "cloud/rollouts/inputs.py",
    "cloud/rollouts/plan.py",
    "cloud/rollouts/state.py",
    "cloud/rollouts/stats.py",
    "cloud/telemetry/chain.py",
    "cloud/federation/cohort.py",
    "cloud/alerts/rules.py",
    "cloud/drift/stats.py",
    "cloud/drift/report.py",
]
# What a pure module must not import: databases, brokers, HTTP, web frameworks, processes, the filesystem.
IO_MODULES = {
    "sqlmodel", "sqlalchemy", "psycopg", "paho", "amqtt", "httpx", "requests", "fastapi", "starlette", "uvicorn",
    "socket", "subprocess", "threading", "os", "shutil", "pathlib", "tempfile", "sqlite3", "onnxruntime",
}  # fmt: skip
# Project modules a pure module may use: the wire, the error types, and other pure modules.
PURE_PROJECT_ALLOWED = ("protocol", "cloud.errors", "agent.update.state")


def imported_modules(path: Path) -> set[str]:
    """Dotted names of every module imported anywhere in a file (including inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
    return found


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages imported anywhere in a module."""
    return {name.split(".")[0] for name in imported_modules(path)} & PROJECT_PACKAGES


def forbidden_imports(package: str, path: Path) -> list[str]:
    """Project imports of `path` (in `package`) that the package rules do not allow."""
    allowed = ALLOWED[package]
    bad = []
    for name in sorted(imported_modules(path)):
        top = name.split(".")[0]
        if top not in PROJECT_PACKAGES or top == package or top in allowed:
            continue
        if any(name == a or name.startswith(a + ".") for a in allowed if "." in a):
            continue
        bad.append(name)
    return bad


def impure_imports(path: Path) -> list[str]:
    """Imports of `path` that do IO, or project modules outside the pure set."""
    pure_names = {p.removesuffix(".py").replace("/", ".") for p in PURE_MODULES}
    bad = []
    for name in sorted(imported_modules(path)):
        top = name.split(".")[0]
        allowed = name in pure_names or name.startswith(PURE_PROJECT_ALLOWED)
        impure_project = top in PROJECT_PACKAGES and not allowed
        if top in IO_MODULES or impure_project:
            bad.append(name)
    return bad


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_architecture_allows(package: str) -> None:
    violations = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for name in forbidden_imports(package, path)
    ]
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


@pytest.mark.parametrize("module", PURE_MODULES)
def test_pure_module_does_no_io(module: str) -> None:
    bad = impure_imports(ROOT / module)
    assert not bad, f"{module} is a pure decision module but imports {bad}"


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cloud.app import create_app\n    import agent.runtime\n")
    assert imported_packages(module) == {"cloud", "agent"}
    assert forbidden_imports("simulators", module) == ["cloud.app"]
    assert forbidden_imports("agent", module) == ["cloud.app"]


def test_checker_lets_simulators_use_only_the_api_client(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("from cloud.client import ApiClient\nfrom cloud.models import Device\n")
    assert forbidden_imports("simulators", module) == ["cloud.models"]


def test_checker_sees_io_in_a_pure_module(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text(
        "from sqlmodel import Session\nimport paho.mqtt.client\nfrom cloud.models import Device\n"
        "from cloud.rollouts.plan import RolloutPlan\nfrom protocol.messages import DesiredState\n"
    )
    assert impure_imports(module) == ["cloud.models", "paho.mqtt.client", "sqlmodel"]
