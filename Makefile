# `make test` and `make demo` work on a fresh CPU-only machine: they create .venv (reusing an
# installed torch through --system-site-packages), install torch==2.13.0 (a CPU build here)
# only if no torch is importable, then install fusedopt with its test tools.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test lint format demo bench gpu-check clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"

# Without a GPU the kernels run on CPU through the Triton interpreter (tests/conftest.py).
test: setup
	$(PY) -m pytest -q tests

lint: setup
	$(PY) -m ruff check fusedopt tests benchmarks
	$(PY) -m ruff format --check fusedopt tests benchmarks

format: setup
	$(PY) -m ruff check --fix fusedopt tests benchmarks
	$(PY) -m ruff format fusedopt tests benchmarks

demo: setup
	$(PY) -m fusedopt.demo

# GPU only: tests on the GPU and step timings (see benchmarks/gpu_check.sh).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
