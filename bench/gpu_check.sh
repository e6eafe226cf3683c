#!/usr/bin/env bash
# One call on a GPU machine: build with the CUDA kernels, run the test suite there
# (triton and cuda backends on CUDA tensors), then the GPU benchmarks that fit the time.
#
#   OUT=/some/dir bash bench/gpu_check.sh [tests|bench|graphs|compile|all]     (default: all)
#
# `all` builds, tests, then times the bf16 op cases, the eager model steps and, as the time
# left allows, the cuda backend's train fwd+bwd again with its kernels in single blocks
# (HIRES_CUDA_CLUSTERS=0) and, where timm is installed, timm's ResNet-D before and after
# fuse(): the most wanted first, since the stages' limits add up to more than the budget.
# Not in `all`, to keep that within one call: `graphs` runs the GPU-only training tests
# (a few steps of `hires train --cuda-graphs` with no host sync in the step); `compile`
# times the model steps under torch.compile.
#
# Each stage has its own time limit so one slow stage cannot eat the others, and the whole
# call keeps within $GPU_BUDGET seconds (default 560, under the lent device's 600-second
# command limit): a stage gets what is left of it, and is skipped with under 30 s left.
# Logs and benchmark JSON go to $OUT (the lent-device tool brings back what is written there).
# Needs torch with CUDA, triton, ninja, pybind11, pytest, pytest-benchmark installed;
# pytest-xdist and pytest-timeout are used when present.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/.gpu-out}"
mkdir -p "$OUT"
what="${1:-all}"
export PYTHONUNBUFFERED=1 MAX_JOBS="${MAX_JOBS:-16}" TORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-9.0}"

deadline=$((SECONDS + ${GPU_BUDGET:-560}))

stage() {  # stage NAME SECONDS CMD...: run CMD with a limit, log to $OUT/NAME.log, print a summary line
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS left=$((deadline - SECONDS))
  if [ "$left" -lt 30 ]; then
    echo "== $name: skipped, $left s left of the call's budget"
    return 124
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  timeout -s INT -k 15 "$limit" "$@" >"$OUT/$name.log" 2>&1  # SIGINT: pytest still prints its summary
  local rc=$?
  echo "== $name: rc=$rc in $((SECONDS - t0)) s (limit $limit)"
  tail -n 4 "$OUT/$name.log" | sed 's/^/   /'
  return $rc
}

{ nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"
  nvcc --version | tail -n 2; date -u; git log -1 --format='commit %h %s' 2>/dev/null; } >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

stage build 240 python3 -m pip install -e . --no-build-isolation --no-deps --no-index -v \
  || stage build-cpu-only 120 env HIRES_BUILD_CUDA=0 python3 -m pip install -e . --no-build-isolation --no-deps --no-index
python3 -c "import hires_kernels; print('backends:', hires_kernels.available_backends())" 2>&1 | tee -a "$OUT/env.txt"

xdist=(); python3 -c "import xdist" 2>/dev/null && xdist=(-n 12)
tlimit=(); python3 -c "import pytest_timeout" 2>/dev/null && tlimit=(--timeout 150)

if [ "$what" = all ] || [ "$what" = tests ]; then
  # The CPU-only suites (emulated CUDA, nvcc compile, data, training, analysis) run in CI.
  # One thread per xdist worker: workers with 16 threads each starved the CPU tests there.
  OMP_NUM_THREADS=1 stage tests "${TEST_LIMIT:-240}" python3 -m pytest tests -v -rfE "${xdist[@]}" "${tlimit[@]}" -p no:cacheprovider \
    --ignore=tests/test_cuda_emulated.py --ignore=tests/test_cuda_compile.py --ignore=tests/test_cuda_traffic.py --ignore=tests/test_cuda_races.py \
    --ignore=tests/test_data.py --ignore=tests/test_train.py --ignore=tests/test_runs.py \
    --ignore=tests/test_paper_script.py --ignore=tests/test_analysis.py --ignore=tests/test_ddp.py ${TEST_ARGS:-}
  grep -E "^(FAILED|ERROR)" "$OUT/tests.log" | head -n 40
fi

if [ "$what" = graphs ]; then
  stage train_gpu "${GRAPHS_LIMIT:-300}" python3 -m pytest tests/test_train.py -m gpu -v -rfE -p no:cacheprovider
fi

if [ "$what" = compile ]; then
  stage bench_models_compile "${COMPILE_LIMIT:-540}" python3 -m pytest bench/test_bench_models.py -q -p no:cacheprovider \
    -m "gpu and compile" -k "${COMPILE_K:-32px}" --benchmark-max-time=0.5 --benchmark-min-rounds=5 \
    --benchmark-json="$OUT/gpu_models_compile.json"
fi

if [ "$what" = all ] || [ "$what" = bench ]; then
  stage bench_op_bf16 "${BENCH_LIMIT:-150}" python3 -m pytest bench/test_bench_projection.py -q -p no:cacheprovider \
    -m gpu -k "bf16cl and not compile" --benchmark-max-time=0.1 --benchmark-min-rounds=20 \
    --benchmark-json="$OUT/gpu_op_bf16.json"
  stage bench_models "${MODEL_LIMIT:-100}" python3 -m pytest bench/test_bench_models.py -q -p no:cacheprovider \
    -m "gpu and not compile" --benchmark-max-time=0.5 --benchmark-min-rounds=5 \
    --benchmark-json="$OUT/gpu_models_eager.json"
  # The cuda backend's train fwd+bwd with its kernels in single blocks: against the run above
  # (thread-block clusters: dW everywhere, row tiles on the H' = 4 shapes), whether they pay.
  # Ids start with the device ("cuda-..."), so the provider is picked by leaving the others out.
  HIRES_CUDA_CLUSTERS=0 stage bench_op_bf16_no_clusters "${NOCLUSTER_LIMIT:-60}" python3 -m pytest \
    bench/test_bench_projection.py -q -p no:cacheprovider -m gpu \
    -k "bf16cl and train and fwdbwd and not eager and not triton and not compile" \
    --benchmark-max-time=0.1 --benchmark-min-rounds=20 --benchmark-json="$OUT/gpu_op_bf16_no_clusters.json"
  if python3 -c "import timm" 2>/dev/null; then
    stage bench_timm "${TIMM_LIMIT:-120}" python3 -m pytest bench/test_bench_timm.py -q -p no:cacheprovider -m gpu \
      --benchmark-max-time=0.5 --benchmark-min-rounds=5 --benchmark-json="$OUT/gpu_timm.json"
  fi
fi

if ls "$OUT"/gpu_*.json >/dev/null 2>&1; then
  python3 - "$OUT"/gpu_*.json <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        benchmarks = json.load(open(path))["benchmarks"]
    except (OSError, ValueError, KeyError) as e:  # a stage cut short may leave no complete JSON
        print(f"{path}: unreadable ({e})")
        continue
    for b in benchmarks:
        i = b["extra_info"]
        print(f"{b['name'][b['name'].find('[') + 1:-1]:<60} {i.get('ms', 0):8.4f} ms  graph {i.get('ms_graph') or 0:8.4f}"
              f"  x{i.get('speedup_vs_eager') or 0:5.2f}")
PY
fi
