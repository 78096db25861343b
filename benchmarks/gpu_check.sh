#!/usr/bin/env bash
# The one-call GPU check (see README "GPU check"): build, GPU tests, benchmarks beside their peers,
# one summary table printed last. Results land in $OUT (the device tool's output folder) or runs/gpu_check.
#
#   bash benchmarks/gpu_check.sh                               # build, GPU tests, the kernel benchmarks
#   SET=e2e SKIP_TESTS=1 bash benchmarks/gpu_check.sh          # then the end-to-end benchmarks (second call)
#   BENCH="bench_attention.py" bash benchmarks/gpu_check.sh   # any subset of benchmark files
#
# Stage time limits keep each call inside ~9 minutes; a stage that runs out still leaves the others' results.
# Afterwards: copy $OUT/<date>-<card>.json to benchmarks/results/ and the table ($OUT/summary.md) into docs/results.md.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/runs/gpu_check}
mkdir -p "$OUT"
PY=${PY:-python}
card=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1)
tag="$(date +%F)-$(echo "${card:-unknown}" | tr -cs 'A-Za-z0-9' '-' | sed 's/-$//' | tr 'A-Z' 'a-z')"
echo "== card: ${card:-none}; results tag: $tag"
nvidia-smi --query-gpu=name,memory.total,clocks.max.sm,driver_version --format=csv 2>/dev/null | tee "$OUT/card.txt"

# Peers that are not preinstalled: the Liger wheel, carried in wheels/ (ignored by git).
if ls wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-deps wheels/*.whl >"$OUT/peers.log" 2>&1 && echo "== installed peers: $(ls wheels)"
fi

echo "== build"
export INTERNLM_KERNELS_CUDA=ON INTERNLM_KERNELS_CUDA_ARCHS=${INTERNLM_KERNELS_CUDA_ARCHS:-90a}
if ! timeout 240 $PY -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
fi
$PY -c "import internlm_kernels._C as C; print('extension: cuda', C.built_with_cuda(), repr(C.cuda_device_error()))"

tests_rc=0
if [ "${SKIP_TESTS:-0}" != 1 ]; then
  echo "== GPU tests"
  timeout ${TEST_TIMEOUT:-150} $PY -m pytest -q -m gpu tests -p no:cacheprovider --junitxml="$OUT/gpu-tests.xml" \
    2>&1 | tee "$OUT/gpu-tests.log" | tail -25
  tests_rc=${PIPESTATUS[0]}
fi

echo "== benchmarks"
# Each file runs in its own pytest with its own time limit and JSON, so one slow file cannot take the others' results.
declare -A limit=([bench_fused.py]=70 [bench_cross_entropy.py]=40 [bench_adamw.py]=30 [bench_attention.py]=90
                  [bench_model.py]=60 [bench_train.py]=50 [bench_overhead.py]=60 [bench_decode.py]=60
                  [bench_logprobs.py]=40 [bench_generation.py]=120 [bench_distributed.py]=90 [bench_patch.py]=60
                  [bench_ppo.py]=90)
# Two sets, each sized for one device call of <= 10 minutes (build ~1-2 min, GPU tests <= 150 s, then the set):
#   kernels (default): the ops beside their peers, ~6 min of benchmarks at most
#   e2e:               model, trainer, overhead, generation, patch, PPO, distributed (run with SKIP_TESTS=1 on a
#                      machine that still has the build from the first call)
declare -A sets=(
  [kernels]="bench_fused.py bench_cross_entropy.py bench_adamw.py bench_attention.py bench_decode.py bench_logprobs.py"
  [e2e]="bench_model.py bench_train.py bench_overhead.py bench_generation.py bench_patch.py bench_ppo.py bench_distributed.py"
)
jsons=()
bench_rc=0
for f in ${BENCH:-${sets[${SET:-kernels}]}}; do
  [ -f "benchmarks/$f" ] || { echo "no benchmarks/$f"; continue; }
  json="$OUT/bench-${f%.py}.json"
  echo "-- $f (limit ${limit[$f]:-60} s)"
  timeout ${limit[$f]:-60} $PY -m pytest -q "benchmarks/$f" -p no:cacheprovider --benchmark-json="$json" \
    --benchmark-disable-gc 2>&1 | tee "$OUT/bench-${f%.py}.log" | tail -4
  rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || { echo "   $f: rc=$rc (124 = ran out of time)"; bench_rc=$rc; }
  [ -f "$json" ] && jsons+=("$json")
done

echo "== summary ($card)"
tests_arg=()
[ -f "$OUT/gpu-tests.xml" ] && tests_arg=(--tests "$OUT/gpu-tests.xml")
if [ ${#jsons[@]} -gt 0 ]; then
  $PY benchmarks/summarize.py "${jsons[@]}" "${tests_arg[@]}" --markdown "$OUT/summary.md" --merged "$OUT/$tag.json"
else
  echo "no benchmark JSON"
fi
echo "gpu tests rc=$tests_rc, benchmarks rc=$bench_rc"
[ "$tests_rc" = 0 ] && [ "$bench_rc" = 0 ]
