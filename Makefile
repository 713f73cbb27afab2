# `make test`, `make check` and `make demo` work on a fresh CPU-only machine: they create .venv
# (reusing an installed torch through --system-site-packages), install torch==2.13.0 (a CPU build
# here) only if no torch is importable, then install fusedopt with its test tools.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: setup test fuzz lint format check demo bench bench-smoke gpu-check clean

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

setup: $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"

# Without a GPU the kernels run on CPU through the Triton interpreter (tests/conftest.py). One
# pytest worker per core, whole files to a worker (module-scoped fixtures: compiled steps, gloo
# process groups): about 3,400 tests in 17 minutes on this project's 2-core CPU machine (2026-12-08).
test: setup
	$(PY) -m pytest -q -n auto --dist loadfile tests

# The differential fuzzer against torch (tests/test_fuzz.py) for a release: new random sequences
# for FUSEDOPT_FUZZ_MINUTES (default 10) instead of the fixed ones `make test` runs (~1.5 min).
fuzz: setup
	FUSEDOPT_FUZZ=long $(PY) -m pytest -q -s tests/test_fuzz.py

lint: setup
	$(PY) -m ruff check fusedopt tests benchmarks
	$(PY) -m ruff format --check fusedopt tests benchmarks

format: setup
	$(PY) -m ruff check --fix fusedopt tests benchmarks
	$(PY) -m ruff format fusedopt tests benchmarks

# The main job: every fused optimizer and loss against torch on this machine (CPU: through the
# Triton interpreter, about a minute); exits non-zero on any result outside the tolerance. Tables on
# stdout, CSV and PNG in fusedopt-check/.
check: setup
	$(PY) -m fusedopt check

demo: setup
	$(PY) -m fusedopt.demo

# Every suite (optim, losses, amp, host). Timings need a CUDA GPU; without one `bench` runs its
# smoke version and times only the host suite. Output in fusedopt-bench/.
bench: setup
	$(PY) -m fusedopt bench

bench-smoke: setup
	$(PY) -m fusedopt bench --smoke

# GPU only: tests, check and benchmarks on the GPU (see benchmarks/gpu_check.sh).
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info fusedopt-bench fusedopt-check
