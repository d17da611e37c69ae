# Two commands set everything up on a fresh machine with only Python (>=3.10) and make:
#   make demo   - create .venv, install kdscope with pinned dependencies, run the whole miniature study
#   make test   - same environment plus test-only assets, then run the test suite
# Use an existing environment (e.g. one with a CUDA build of torch) with: make demo VENV=/path/to/env
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# The CPU build of PyTorch these machines carry; a GPU user's existing torch is never replaced (see install-torch).
TORCH_CPU ?= torch==2.13.0

.PHONY: install install-torch install-test demo test bench-env clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip

# Keep any torch that is already installed (a CUDA build stays); otherwise CUDA machines get the default
# wheel and CPU-only machines get the CPU build.
install-torch: $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "kdscope: keeping installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install -q torch; \
	else \
	  $(PIP) install -q $(TORCH_CPU) || $(PIP) install -q $(TORCH_CPU) --index-url https://download.pytorch.org/whl/cpu; \
	fi

$(VENV)/.kdscope-installed: pyproject.toml requirements.lock | install-torch
	$(PIP) install -q -r requirements.lock
	$(PIP) install -q --no-deps -e .
	touch $@

install: install-torch $(VENV)/.kdscope-installed

$(VENV)/.kdscope-test-installed: requirements-test.txt $(VENV)/.kdscope-installed
	$(PIP) install -q -r requirements-test.txt
	$(PIP) install -q --no-deps -r requirements-test-assets.txt
	touch $@

install-test: install $(VENV)/.kdscope-test-installed

demo: install
	$(VENV)/bin/kdscope demo

test: install-test
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) kdscope-demo .pytest_cache
