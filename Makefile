# Targets named in README.md. A CPU machine gets a venv with the CPU build of torch; a machine that already has
# torch with CUDA (the GPU machines) builds against what is there with `make install-gpu`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
PYTEST_WORKERS ?= 2

.PHONY: install install-gpu test demo bench gpu-check clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q "torch==$(TORCH_CPU_VERSION)" "triton==$(TRITON_VERSION)"
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q -e .

# On the offline GPU machine: torch, triton and the build tools are preinstalled.
install-gpu:
	pip install --no-build-isolation --no-deps -e .

test:
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests

demo:
	$(PY) -m train.pipeline

bench:
	$(PY) -m pytest -q benchmarks

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build runs .pytest_cache .benchmarks
