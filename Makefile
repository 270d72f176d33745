# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
# Both create (or reuse) a virtual environment in $(VENV) with the exact versions of
# requirements.lock (.ci/make_venv.sh says how torch is chosen) and build the C++ extension.
VENV    ?= .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.rega-installed
# Reinstall when the lock, the build description or the C++ sources change.
SOURCES := requirements.lock pyproject.toml setup.py $(wildcard csrc/*.cpp csrc/*.h)
PYTEST_ARGS ?=

.PHONY: install demo test test-multiprocess lint test-latest test-oldest lock wheel-check \
	test-gpu gpu-check bench-quick clean

install: $(STAMP)

$(STAMP): $(SOURCES)
	.ci/make_venv.sh $(VENV) locked
	touch $(STAMP)

# The same suite on the newest releases the ranges in pyproject.toml allow (in .venv-latest):
# run it on purpose, e.g. before `make lock`, to learn what upstream changed before CI does.
test-latest:
	.ci/make_venv.sh .venv-latest latest
	.venv-latest/bin/python -m pytest -q $(PYTEST_ARGS)

# The same suite on exactly the declared lower bounds (in .venv-oldest): the floor of each range
# is a claim that this passes.
test-oldest:
	.ci/make_venv.sh .venv-oldest oldest
	.venv-oldest/bin/python -m pytest -q $(PYTEST_ARGS)

# Refresh requirements.lock from the newest releases (in a clean .venv-lock); commit it once
# `make test` passes with it.
lock:
	rm -rf .venv-lock
	.ci/make_venv.sh .venv-lock lock

# Build the wheel, install it in a fresh environment and use it from outside the checkout.
wheel-check:
	.ci/wheel_check.sh

demo: $(STAMP)
	$(VENV)/bin/rega-engine demo

# The suite without the cases marked `multiprocess` (torchrun with 2-4 gloo processes: FSDP, HSDP,
# CP, TP, elastic resume, sharded loading, rank faults; and TP at 4 and 8 ranks simulated in one
# process), which take about 8 minutes of a 2-core machine by themselves: `make test` stays under
# 15 minutes there, and `make test-multiprocess` runs the rest.
# CI (.ci/run) runs both; test-latest and test-oldest run everything.
test: $(STAMP)
	$(PY) -m pytest -q -m "not multiprocess" $(PYTEST_ARGS)

test-multiprocess: $(STAMP)
	$(PY) -m pytest -q -m multiprocess $(PYTEST_ARGS)

# ruff with the rules in pyproject.toml ([tool.ruff]); .ci/run runs it before the tests.
lint: $(STAMP)
	$(PY) -m ruff check .

test-gpu: $(STAMP)
	$(PY) -m pytest -q -m gpu $(PYTEST_ARGS)

# The first thing to run on a CUDA machine, and all a short GPU slot needs: makes rega_engine
# importable from what is installed (never the network), runs the GPU tests, the kernel, end-to-end
# and FP8 benchmarks in that order, ends by a deadline (DEADLINE seconds, 480 by default) and
# writes benchmarks/results/gpu_check_<device>.{json,md} as it goes. `make gpu-check ONLY=kernels`
# runs some parts (tests, kernels, e2e, fp8). It uses the venv where one exists, else the
# machine's python3, and deliberately does not depend on $(STAMP), which would install packages.
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
ONLY ?=
DEADLINE ?=
gpu-check:
	$(GPU_PYTHON) benchmarks/gpu_check.py $(if $(ONLY),--only $(ONLY)) $(if $(DEADLINE),--deadline $(DEADLINE))

bench-quick: $(STAMP)
	$(VENV)/bin/rega-engine bench --quick

clean:
	rm -rf build *.egg-info rega_engine/_C*.so .venv-latest .venv-oldest .venv-lock
