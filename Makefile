# The two commands: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install into it on first use (pinned through constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: demo test install lint typecheck bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -q -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/edgefleet demo

test: install
	$(BIN)/ruff check .
	$(BIN)/mypy
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/bench_agent.py

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
