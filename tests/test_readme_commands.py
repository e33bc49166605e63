"""The README's two commands are the documented entry points: they must keep working."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def readme_commands() -> list[str]:
    """The commands of the README's first code block."""
    block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert block, "README must start with a sh code block holding the two commands"
    return [line.split("#")[0].strip() for line in block.group(1).splitlines() if line.strip()]


def test_readme_starts_with_the_demo_and_test_commands() -> None:
    assert readme_commands() == ["make demo", "make test"]


def test_ci_runs_exactly_the_readme_test_command() -> None:
    script = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", script, re.M), ".ci/run must call the README's test command"


@pytest.mark.e2e
@pytest.mark.timeout(600)
def test_make_demo_runs_the_main_job_and_exits_zero(tmp_path: Path) -> None:
    venv = Path(sys.executable).parent.parent
    env = dict(os.environ, VENV=str(venv), HOME=str(tmp_path), COLUMNS="120")
    result = subprocess.run(
        ["make", "-C", str(ROOT), "demo", f"VENV={venv}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=540,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, output[-4000:]
    assert "20 devices on digits-cnn:1.0.0" in output, output[-4000:]
    for variant in ("tflite-int8", "int8-static", "fp32"):  # the mixed fleet runs several variants
        assert f"│ {variant}" in output, f"no device runs {variant}:\n{output[-4000:]}"
    assert "fleet summary" in output
    assert "demo-0019" in output, "the summary must list every device"
    # The dashboard's address and a viewer token to sign in with, and how to keep it up (rich may wrap the lines).
    dashboard = r"dashboard\s+http://127\.0\.0\.1:\d+/ui/\s+sign\s+in\s+with\s+the\s+viewer\s+token\s+\S+"
    assert re.search(dashboard, output), output[-4000:]
    assert re.search(r"edgefleet\s+demo\s+--stay", output), output[-4000:]
