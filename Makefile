# Targets named in README.md. A CPU machine gets a venv with the CPU build of torch; a machine that already has
# torch with CUDA (the GPU machines) builds against what is there with `make install-gpu`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_CPU_VERSION ?= 2.13.0
TRITON_VERSION ?= 3.6.0
PYTEST_WORKERS ?= 2

STAMP := $(VENV)/.installed

.PHONY: install install-gpu lint test demo serve data eval bench gpu-check clean

install: $(STAMP)

# Re-runs when the build or the dependencies change; the editable install rebuilds the extension.
$(STAMP): pyproject.toml CMakeLists.txt requirements-dev.txt $(wildcard csrc/*.h csrc/*/*.h csrc/*/*.cpp csrc/*/*.cu csrc/*.cpp)
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
# AVX2_ONLY caps all three ISA choosers: ATen's kernels, MKL's and oneDNN's, which pick theirs from CPUID and ignore
# ATEN_CPU_CAPABILITY (under it alone MKL's sgemm ran its AVX-512 path on an Intel Xeon, oneDNN on an AMD EPYC).
# Each pass compiles into its own inductor cache under build/ (not the machine-wide /tmp one, which other checkouts'
# runs share), so no compiled kernel of another run or of the other ISA is reused.
AVX2_ONLY := ATEN_CPU_CAPABILITY=avx2 MKL_ENABLE_INSTRUCTIONS=AVX2 ONEDNN_MAX_CPU_ISA=AVX2
ISA_TESTS := tests/test_cpu_fused.py tests/test_linear_cpu.py tests/test_gemm_choice.py tests/test_decode_step.py \
	tests/test_attention_cpu.py tests/test_attention_cpu_kernels.py tests/test_decode_attention_cpu.py \
	tests/test_attention_choice.py tests/test_cross_entropy_cpu.py tests/test_rms_norm_cpu_kernels.py \
	tests/test_swiglu_cpu_kernels.py \
	tests/test_distributed_2d.py tests/test_distributed_zero.py tests/test_tensor_parallel_stages.py tests/test_reward.py \
	tests/test_ppo_iteration.py

test: $(STAMP)
	TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor $(PY) -m pytest -q -n $(PYTEST_WORKERS) tests
	$(AVX2_ONLY) TORCHINDUCTOR_CACHE_DIR=$(CURDIR)/build/inductor-avx2 \
		$(PY) -m pytest -q -n $(PYTEST_WORKERS) $(ISA_TESTS)

# make demo SEED=1 THREADS=2: the seed reaches every stage (pretraining, SFT, reward model, PPO); THREADS empty
# keeps the configs' one thread. DEMO_ARGS: any further overrides, e.g. DEMO_ARGS=--run.name=seed1.
SEED ?= 0
THREADS ?=
DEMO_ARGS ?=
demo: $(STAMP)
	$(PY) -m train.pipeline --run.seed=$(SEED) $(if $(THREADS),--run.threads=$(THREADS)) $(DEMO_ARGS)

# The demo's final chat model (make demo): the released PPO round's actor (runs/ppo_tiny/released, the best unflagged
# round on the validation prompts), else the newest SFT export (every round flagged, or no PPO run). Byte tokenizer,
# as the demo's. SERVE_ARGS passes more options (e.g. SERVE_ARGS="--port 8001 --max-batch 32"); docs/serving.md.
SERVE_MODEL ?= $(or $(wildcard runs/ppo_tiny/released/actor),$\
                    $(lastword $(sort $(wildcard runs/sft_tiny/checkpoints/step_[0-9]*[0-9]/model))))
serve: $(STAMP)
	@test -n "$(SERVE_MODEL)" || { echo "make serve: no chat model under runs/ (run make demo first)"; exit 1; }
	$(PY) -m models.server --model $(SERVE_MODEL) --tokenizer byte --served-model-name internlm2-demo $(SERVE_ARGS)

# The data pipeline on the shipped raw sample (docs/data.md); the kept set is runs/data/kept/, the long-context set
# runs/data/long_context/, the accounting runs/data/stats.json. Reruns resume; DATA_ARGS="--overwrite" starts over.
DATA_OUT ?= runs/data
DATA_ARGS ?=
data: $(STAMP)
	$(PY) -m train.data.pipeline --input train/data/sample --output $(DATA_OUT) $(DATA_ARGS)

# The shipped lm-eval tasks and the long-context suite on the demo's final checkpoints (run `make demo` first):
# runs/eval/report.md, runs/eval/<checkpoint>/, and "eval" in runs/summary.json.
eval: $(STAMP)
	$(PY) -m train.eval.suite

bench: $(STAMP)
	$(PY) -m pytest -q benchmarks

gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build runs .pytest_cache .benchmarks
