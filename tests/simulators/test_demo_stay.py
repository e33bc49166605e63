"""`edgefleet demo --stay`: the dashboard line, and staying up until Ctrl-C (the whole demo runs in
tests/test_readme_commands.py)."""

from __future__ import annotations

import io
import os
import signal
import threading

import pytest
from rich.console import Console
from typer.testing import CliRunner

from simulators import demo


def test_stay_prints_the_dashboard_and_returns_on_ctrl_c(monkeypatch: pytest.MonkeyPatch) -> None:
    ticks: list[float] = []

    def sleep(seconds: float) -> None:
        ticks.append(seconds)
        if len(ticks) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(demo.time, "sleep", sleep)
    out = io.StringIO()
    demo._stay(Console(file=out, width=200), "dashboard http://127.0.0.1:9/ui/  sign in with the viewer token efa_x")
    assert len(ticks) == 3, "it stayed up until the interrupt"
    text = out.getvalue()
    assert "http://127.0.0.1:9/ui/" in text and "Ctrl-C" in text and "stopping" in text


def test_stay_ends_on_sigterm_too_and_restores_the_handlers() -> None:
    before = signal.getsignal(signal.SIGTERM)
    out = io.StringIO()
    timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGTERM))
    timer.start()
    demo._stay(Console(file=out, width=200), "dashboard http://127.0.0.1:9/ui/")
    timer.join()
    assert "stopping" in out.getvalue()
    assert signal.getsignal(signal.SIGTERM) == before


def test_demo_offers_stay_in_its_help() -> None:
    import typer

    app = typer.Typer()
    app.command()(demo.demo)
    result = CliRunner().invoke(app, ["--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "--stay" in result.output
