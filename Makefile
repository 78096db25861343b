# Targets named in README.md. A CPU machine gets a venv with the CPU build of torch; a machine that already has
# torch with CUDA (the GPU machines) builds against what is there with `make install-gpu`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
PYTEST_WORKERS ?= 2

STAMP := $(VENV)/.installed

.PHONY: install install-gpu lint test demo bench gpu-check clean

install: $(STAMP)

# Re-runs when the build or the dependencies change; the editable install rebuilds the extension.
$(STAMP): pyproject.toml CMakeLists.txt requirements-dev.txt $(wildcard csrc/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*.cpp)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "torch==$(TORCH_CPU_VERSION)" "triton==$(TRITON_VERSION)"
	$(PIP) install -q -r requirements-dev.txt
	$(PIP) install -q -e .
	touch $(STAMP)

# On the offline GPU machine: torch, triton and the build tools are preinstalled.
install-gpu:
	pip install --no-build-isolation --no-deps -e .

lint: $(STAMP)
	$(VENV)/bin/ruff check .

# The suite runs with ATen's best ISA for this CPU (AVX-512 where present); the distributed-equality and CPU-path
# tests run once more as on an AVX2-only CPU, so a comparison that holds for one ISA only fails here, not elsewhere.
ISA_TESTS := tests/test_cpu_fused.py tests/test_linear_cpu.py tests/test_attention_cpu.py tests/test_cross_entropy_cpu.py \
	tests/test_distributed_2d.py tests/test_distributed_zero.py tests/test_tensor_parallel_stages.py tests/test_reward.py

test: $(STAMP)
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) tests
	ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q -n $(PYTEST_WORKERS) $(ISA_TESTS)

# make demo SEED=1 THREADS=2: the seed reaches every stage (pretraining, SFT, reward model, PPO); THREADS empty
# keeps the configs' one thread. DEMO_ARGS: any further overrides, e.g. DEMO_ARGS=--run.name=seed1.
SEED ?= 0
THREADS ?=
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m train.pipeline --run.seed=$(SEED) $(if $(THREADS),--run.threads=$(THREADS)) $(DEMO_ARGS)

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build runs .pytest_cache .benchmarks
