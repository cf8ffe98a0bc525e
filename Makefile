# Two commands for a new user: `make demo` (the main job) and `make test` (lint + the whole test suite).
# Each creates .venv and installs what it needs: the CPU build of torch, then this package in editable mode
# without build isolation (which would download a multi-GB CUDA torch) so the native extension builds against it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

.PHONY: install demo test lint

$(VENV)/.installed: pyproject.toml $(wildcard setup.py csrc/*)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q --no-build-isolation -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(PY) -m tests.readme_snippets README.md

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite on the default backends (native on CPU when built), then the tuner tests forced onto the Triton
# kernels (CPU interpreter when there is no GPU) and onto the PyTorch reference.
test: lint
	$(PY) -m pytest
	FEDLORA_BACKEND=triton $(PY) -m pytest tests/test_tuner.py
	FEDLORA_BACKEND=torch $(PY) -m pytest tests/test_tuner.py
