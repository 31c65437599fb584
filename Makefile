# The README's commands. Every target installs what it needs into .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export NO_ALBUMENTATIONS_UPDATE := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
# The ephemeral Prefect server's default 20 s start-up budget fails on a loaded laptop.
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS ?= 90

.PHONY: install demo test test-all lint bench bench-full bench-gpu clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	# taming's modules for the tokenizer tests, without its pytorch-lightning pin (pyproject: dev)
	$(BIN)/python -m pip install -q --no-deps "taming-transformers-rom1504>=0.0.6"
	# img2dataset pins the Python 3.6 `dataclasses` backport; in Prefect's server process
	# (uvicorn --app-dir site-packages) it shadows the stdlib module and the server cannot start.
	$(BIN)/python -m pip uninstall -y -q dataclasses || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/racm3 demo

test: install
	$(BIN)/pytest -m "not slow"

test-all: install
	$(BIN)/pytest

lint: install
	$(BIN)/ruff check storage pipelines model flows tests benchmarks
	$(BIN)/python -m tests.pipelines.core.test_imports  # no import cycles, no stage -> stage
	$(BIN)/mypy

bench: install  # every benchmark at small sizes, ratios printed at the end (minutes)
	PYTHONPATH=$(CURDIR) $(BIN)/python benchmarks/run_all.py

bench-full: install  # the issue's sizes (the demo alone takes 10-15 minutes)
	PYTHONPATH=$(CURDIR) $(BIN)/python benchmarks/run_all.py --full

bench-gpu: install  # one CUDA device, a few minutes; exits 0 with a message without one
	PYTHONPATH=$(CURDIR) $(BIN)/python benchmarks/bench_gpu.py

clean:
	rm -rf $(VENV) data bench-out
