"""The examples of docs/rollouts.md run as written, so the documentation cannot rot."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[3] / "docs" / "rollouts.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", DOC.read_text(), re.S)


def test_the_doc_has_examples() -> None:
    assert len(python_blocks()) >= 3


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_doc_example_runs(index: int) -> None:
    exec(compile(python_blocks()[index], f"{DOC.name}[{index}]", "exec"), {})
