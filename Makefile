# The two commands: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install into it on first use (pinned through constraints.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: demo test install lint typecheck bench clean lock

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

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

# Re-resolve constraints.txt from pyproject.toml in a scratch venv (torch pinned first: see constraints.txt).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e '.[all,dev]'
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv
