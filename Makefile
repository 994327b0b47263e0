# Two commands do all the set-up on a fresh clone: `make run` and `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# A CPU build keeps CI's install small; a GPU user runs e.g. `make run TORCH_SPEC="torch==2.13.0"`
# with their registry's CUDA build, or any torch>=2.2 already installed in $(VENV).
TORCH_SPEC ?= torch==2.13.0
PEERS ?= 3
ROUNDS ?= 3

.PHONY: install dev browser run test test-swarm lint typecheck pytest clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/pip install "$(TORCH_SPEC)"
	$(BIN)/pip install -e .
	touch $@

$(VENV)/.dev-installed: $(VENV)/.installed
	$(BIN)/pip install -e ".[dev]"
	touch $@

install: $(VENV)/.installed

dev: $(VENV)/.dev-installed

run: install
	$(BIN)/zen-node demo --peers $(PEERS) --rounds $(ROUNDS) --summary-json demo-summary.json

lint: dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

typecheck: dev
	$(BIN)/mypy

# `make test`: lint, types and every test but the swarm tier (tests marked slow: each starts several
# node processes and trains for tens of seconds). `make test-swarm` runs that tier; CI (.ci/run) runs both.
pytest: dev browser
	$(BIN)/pytest -m "not slow"

# The dashboard test loads the page in headless Chromium: Debian's package where apt-get and root are at
# hand; elsewhere that one test is skipped (it says so in pytest's summary).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "chromium not installed: the dashboard's browser test will be skipped"

test: lint typecheck pytest

test-swarm: dev
	$(BIN)/pytest -m slow

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache demo-summary.json zen-demo
