# The two commands: `make demo` runs the main job, `make test` runs the whole suite.
# Both create .venv and install into it on first use (pinned through constraints.txt), and .venv-flower,
# the Flower venv federated learning runs its processes from (pinned through constraints-flower.txt).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
PIP := $(BIN)/pip install -c constraints.txt

.PHONY: demo demo-federated test test-tflite-legacy install flower lint typecheck bench clean lock lock-flower

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.installed: pyproject.toml constraints.txt | $(BIN)/python
	$(PIP) -q -e '.[all,dev]'
	touch $@

install: $(VENV)/.installed

# Flower (flwr 1.42) pins typer, fastapi and uvicorn below what edgefleet needs, so it cannot share .venv: the
# coordinator and the agent run flower-superlink, flower-supernode and flwr from this venv as processes.
FLOWER_VENV := .venv-flower
FLOWER_PKGS := 'flwr[dp]==1.42.0' torch==2.13.0 numpy

$(FLOWER_VENV)/.installed: constraints-flower.txt
	test -x $(FLOWER_VENV)/bin/python || $(PYTHON) -m venv $(FLOWER_VENV)
	$(FLOWER_VENV)/bin/pip install -q -c constraints-flower.txt $(FLOWER_PKGS)
	touch $@

flower: $(FLOWER_VENV)/.installed

demo: install flower
	$(BIN)/edgefleet demo

# The second demo: federated retraining on a small cohort, its candidate canaried (about 5 minutes on 2 cores).
demo-federated: install flower
	$(BIN)/edgefleet demo --federated

test: install flower
	$(BIN)/pip check
	$(FLOWER_VENV)/bin/pip check
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(MAKE) test-tflite-legacy
	$(BIN)/pytest

# The TFLite update test once more in an agent-only venv with tflite-runtime 2.14 and NumPy 1.x, the way an
# older ARM board installs the agent (tflite-runtime is built against NumPy 1.x and fails under NumPy 2).
LEGACY := .venv-tflite-legacy
FIXTURE := build/tflite-fixture
test-tflite-legacy: install
	rm -rf $(FIXTURE)
	$(BIN)/python -m tests.agent.build_tflite_fixture $(FIXTURE)
	test -x $(LEGACY)/bin/python || $(PYTHON) -m venv $(LEGACY)
	$(LEGACY)/bin/pip install -q -c constraints-legacy.txt -e '.[agent]' tflite-runtime numpy onnx pytest pytest-timeout
	EDGEFLEET_TFLITE_FIXTURE_DIR=$(FIXTURE) EDGEFLEET_EXPECT_TFLITE_BACKEND=tflite_runtime \
		$(LEGACY)/bin/python -m pytest -p no:cacheprovider -q tests/agent/test_tflite_update.py

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: install
	$(BIN)/mypy

bench: install
	$(BIN)/python benchmarks/bench_agent.py

clean:
	rm -rf $(VENV) $(LEGACY) $(FLOWER_VENV) build .pytest_cache .mypy_cache .ruff_cache

# Re-resolve constraints.txt from pyproject.toml in a scratch venv (torch pinned first: see constraints.txt).
lock:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install -q torch==2.13.0
	.lock-venv/bin/pip install -q -e '.[all,dev]'
	{ sed -n '/^#/p' constraints.txt; .lock-venv/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.new
	mv constraints.txt.new constraints.txt
	rm -rf .lock-venv

# Re-resolve constraints-flower.txt from FLOWER_PKGS in a scratch venv (torch pinned: see constraints-flower.txt).
lock-flower:
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	echo torch==2.13.0 > .lock-venv/torch.txt
	.lock-venv/bin/pip install -q -c .lock-venv/torch.txt $(FLOWER_PKGS)
	{ sed -n '/^#/p' constraints-flower.txt; .lock-venv/bin/pip freeze | sed 's/+cpu$$//'; } > constraints-flower.txt.new
	mv constraints-flower.txt.new constraints-flower.txt
	rm -rf .lock-venv
