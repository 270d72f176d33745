# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in $(VENV) and build the C++ extension when needed.
VENV    ?= .venv
PY      := $(VENV)/bin/python
PIP     := $(PY) -m pip
STAMP   := $(VENV)/.rega-installed
# Rebuild when the build description or the C++ sources change.
SOURCES := pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
PYTEST_ARGS ?=

.PHONY: install demo test lint test-gpu gpu-check bench-quick clean

install: $(STAMP)

# torch first and on purpose: a machine that already has torch keeps it (the venv sees the system
# site-packages); one without an NVIDIA GPU gets the CPU build and never downloads a CUDA build.
$(STAMP): $(SOURCES)
	test -x $(PY) || python3 -m venv --system-site-packages $(VENV)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "keeping the installed torch $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then \
	  $(PIP) install "torch>=2.4"; \
	else \
	  $(PIP) install --timeout 10 --retries 1 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
	  || $(PIP) install --timeout 10 --retries 1 --index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.15"; \
	fi
	$(PIP) install "setuptools>=64" wheel "pybind11>=2.12"
	$(PIP) install --no-build-isolation -e ".[test]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/rega-engine demo

test: $(STAMP)
	$(PY) -m pytest -q $(PYTEST_ARGS)

# ruff with the rules in pyproject.toml ([tool.ruff]); .ci/run runs it before the tests.
lint: $(STAMP)
	$(PY) -m ruff check .

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

# The first thing to run on a CUDA machine, and all a short GPU slot needs: builds the extension in
# place from what is installed (never the network), runs the GPU tests, the kernel and end-to-end
# benchmarks, and writes benchmarks/results/gpu_check_<device>.{json,md}. `make gpu-check
# ONLY=kernels` reruns one part (tests, kernels, e2e). It uses the venv where one exists, else the
# machine's python3, and deliberately does not depend on $(STAMP), which would install packages.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
ONLY ?=
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(if $(ONLY),--only $(ONLY))

bench-quick: $(STAMP)
	$(VENV)/bin/rega-engine bench --quick

clean:
	rm -rf build *.egg-info rega_engine/_C*.so
