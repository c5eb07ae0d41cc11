# mlflow-er developer commands. Each target creates .venv when it is missing and
# (re)installs only when pyproject.toml changed since the last install (stamp files).
# Works unattended: no prompts, no stdin needed (CI=true friendly).

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        := .venv
PY          := $(VENV)/bin/python
PIP         := $(PY) -m pip
# Prefer python3.11 when the machine has it; any python3 >= 3.10 works.
PYTHON      ?= $(shell command -v python3.11 2>/dev/null || command -v python3 2>/dev/null)
PYTEST_ARGS ?=
DEMO_ARGS   ?=

STAMP_DEMO  := $(VENV)/.stamp-demo
STAMP_DEV   := $(VENV)/.stamp-dev

# pip must never wait for input (credentials prompts etc.) on a CI box without a tty.
export PIP_NO_INPUT := 1
export PIP_DISABLE_PIP_VERSION_CHECK := 1
# Keep MLflow from phoning home from demos and tests: loopback only.
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := true

.PHONY: help demo test lint bench clean distclean

help:
	@echo "make demo   - run examples/train_loop.py with --backend sync, then --backend threaded"
	@echo "make test   - run the test suite (extra pytest args: make test PYTEST_ARGS='-k cli -x')"
	@echo "make lint   - ruff check + mypy"
	@echo "make bench  - mlflow-er bench"
	@echo "make clean  - remove caches, build output and the demo's .demo/ store"
	@echo "make distclean - clean, and remove .venv too"

$(PY):
	@test -n "$(PYTHON)" || { echo "error: no python3 found on PATH" >&2; exit 1; }
	$(PYTHON) -m venv $(VENV)

# The demo logs images, so it needs the `image` extra (Pillow, NumPy).
$(STAMP_DEMO): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[image]' </dev/null
	@touch $@

# `dev` = the test extra (pytest, moto, s3fs, ...) + ruff.
$(STAMP_DEV): pyproject.toml | $(PY)
	$(PIP) install -q -e '.[dev]' </dev/null
	@touch $@

demo: $(STAMP_DEMO)
	$(PY) examples/train_loop.py --backend sync $(DEMO_ARGS) </dev/null
	$(PY) examples/train_loop.py --backend threaded $(DEMO_ARGS) </dev/null

# Three workers on two cores: most tests wait on servers and child processes, not the CPU.
# --dist loadfile keeps a module's tests (and its module-scoped servers) on one worker.
PYTEST_WORKERS ?= 3

test: $(STAMP_DEV)
	@compgen -G "/usr/lib/postgresql/*/bin/initdb" >/dev/null || echo "note: no PostgreSQL server binaries \
	(/usr/lib/postgresql/*/bin/initdb): the production-shaped tests skip here and fail in CI; Debian: \
	apt-get install -y postgresql" >&2
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS) </dev/null

lint: $(STAMP_DEV)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy mlflow_er

bench: $(STAMP_DEV)
	$(VENV)/bin/mlflow-er bench </dev/null

clean:
	rm -rf .demo .pytest_cache .ruff_cache build dist *.egg-info mlruns mlartifacts
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +

# Separate from `clean` because .venv may be shared by other shells working in this tree.
distclean: clean
	rm -rf $(VENV)
