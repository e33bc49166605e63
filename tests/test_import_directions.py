"""The import rules of docs/architecture.md, enforced on the source tree."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = {"protocol", "agent", "cloud", "compression", "federated", "simulators", "tests"}

# package -> project packages it may import (besides itself)
ALLOWED: dict[str, set[str]] = {
    "protocol": set(),
    "compression": {"protocol"},
    "agent": {"protocol", "compression"},
    "cloud": {"protocol"},
    "federated": {"protocol", "compression"},
    "simulators": {"protocol", "agent", "compression"},
}


def imported_packages(path: Path) -> set[str]:
    """Top-level project packages imported anywhere in a module (including inside functions)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & PROJECT_PACKAGES


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_what_the_architecture_allows(package: str) -> None:
    violations = []
    for path in sorted((ROOT / package).rglob("*.py")):
        for imported in imported_packages(path) - {package} - ALLOWED[package]:
            violations.append(f"{path.relative_to(ROOT)} imports {imported}")
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def test_checker_sees_a_forbidden_import(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from cloud.app import create_app\n    import agent.runtime\n")
    assert imported_packages(module) == {"cloud", "agent"}
