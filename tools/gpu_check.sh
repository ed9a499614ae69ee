#!/usr/bin/env bash
# GPU check for a fresh H100/H200 machine with no network (nvcc, cmake, ninja, pybind11,
# scikit-build-core, torch and transformers present). Installs the package for sm_90a (a wheel
# carried in build/gpu-wheel, else built here), runs every test on CUDA (the same tests as on the
# CPU, parametrised by device), then again the CUDA tests of the paths the defaults do not take
# (attention without tensor cores, each GEMM kernel forced, the layers on aphrodite's GEMMs), the
# Python benchmarks on the GPU and the C++ benchmark binaries, all within a time budget
# (GPU_CHECK_BUDGET_S, default 520 s), and prints one compact table on any exit. Logs go to $OUT (or build/gpu-check).
# Usage: bash tools/gpu_check.sh [--quick | --kernels]
#   --quick: tests only; --kernels: the kernels' CUDA tests (attention, linear, projector,
#   preprocessing, layer ops, the model) and the attention and projector benchmarks, under five
#   minutes: for iterating on a kernel within one device session.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
quick=0
kernels=0
[ "${1:-}" = "--quick" ] && quick=1
[ "${1:-}" = "--kernels" ] && kernels=1
export PYTHONUNBUFFERED=1
declare -a rows
row() { rows+=("$(printf '%-34s %-8s %s' "$1" "$2" "$3")"); }
t0=$(date +%s)
gpu=$(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader)
echo "$gpu"

# The whole script must finish inside one device call and print its table last: every step runs
# under `timeout` within what is left of the budget, a step that would start with under 20 s left
# is skipped, and the table prints on any exit.
budget=${GPU_CHECK_BUDGET_S:-520}
left() { echo $(( budget - ($(date +%s) - t0) )); }
limited() {  # seconds, command...: runs it within min(seconds, what is left); 124 on a timeout
  local limit=$1 rest
  shift
  rest=$(left)
  [ "$limit" -gt "$rest" ] && limit=$rest
  [ "$limit" -lt 20 ] && return 125
  timeout -k 10 "$limit" "$@"
}
status_of() {  # exit code -> table word
  case $1 in
    0) echo PASS ;;
    124 | 137) echo TIMEOUT ;;
    125) echo SKIPPED ;;
    *) echo FAIL ;;
  esac
}
finish() {
  [ -f "$out/bench.txt" ] && cat "$out/bench.txt"
  echo
  echo "== GPU check: $gpu in $(( $(date +%s) - t0 ))s (budget ${budget}s) =="
  printf '%s\n' "${rows[@]}" | tee "$out/summary.txt"
}
trap finish EXIT

# 1. Install: a wheel prebuilt for this Python by tools/build_gpu_wheel.sh when one was carried
#    along (build/gpu-wheel), else build here (sm_90a only: the machine's architecture).
pytag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
wheel=$(ls build/gpu-wheel/aphrodite-*-"$pytag"-*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
  "$py" -m pip install -q --no-deps --force-reinstall "$wheel" >"$out/build.log" 2>&1
  rc=$?
  bench_bins=build/gpu-wheel/bin
  what="prebuilt $(head -c 12 build/gpu-wheel/COMMIT)"
else
  "$py" -m pip install -v --no-build-isolation --no-deps . \
    -Ccmake.define.APHRODITE_CUDA=ON -Ccmake.define.APHRODITE_CUDA_ARCHS=90a-real \
    -Ccmake.define.APHRODITE_BUILD_BENCHMARKS=ON -Ccmake.define.APHRODITE_WERROR=ON \
    -Cbuild-dir=build/gpu >"$out/build.log" 2>&1
  rc=$?
  bench_bins=build/gpu/benchmarks/cpp
  what="built here"
fi
if [ $rc = 0 ]; then
  row "install (sm_90a)" PASS "$what, $(( $(date +%s) - t0 ))s"
else
  row "install (sm_90a)" FAIL "see build.log"
  tail -n 60 "$out/build.log"
  exit 1
fi
"$py" -m aphrodite.env

# 2. Every Python test; CUDA cases run because a GPU is present. Test modules whose imports are
#    missing on this machine (e.g. the server's fastapi/openai) are reported, not hidden.
"$py" -c 'import PIL, torch, transformers
print(f"torch {torch.__version__}, transformers {transformers.__version__}, Pillow {PIL.__version__}")'
# Per-test time limits when pytest-timeout is there (a hung kernel then fails its test).
timeout_opt() {
  "$py" -c 'import pytest_timeout' 2>/dev/null && echo "--timeout=$1"
}
ignore=()
missing=$("$py" -c 'import importlib.util as u
print(" ".join(m for m in ("fastapi", "uvicorn", "openai") if u.find_spec(m) is None))')
if [ -n "$missing" ]; then
  # The server is CPU-side code tested in CI; this machine lacks its packages.
  ignore=(--ignore=tests/python/test_server.py --ignore=tests/python/test_server_chat.py
    --deselect tests/python/test_benchmarks.py::test_serving_benchmark_against_a_server)
  row "server tests" "NOT RUN" "missing here: $missing"
fi
selection=(tests/python)
if [ $kernels = 1 ]; then
  selection=(-k cuda tests/python/test_attention.py tests/python/test_linear.py
    tests/python/test_projector.py tests/python/test_image_preprocess.py
    tests/python/test_layer_ops.py tests/python/test_llava_model.py)
fi
# The forced wgmma tilings run in a process of their own below (a clustered one that traps would
# take this process's CUDA context, and every later test, down with it).
forced=tests/python/test_linear.py::test_cuda_wgmma_forced_tiling
limited 240 "$py" -m pytest "${selection[@]}" -q $(timeout_opt 120) -p no:cacheprovider -rfEs \
  "${ignore[@]}" --deselect "$forced" --continue-on-collection-errors --junitxml="$out/pytest.xml" \
  >"$out/pytest.log" 2>&1
rc=$?
label="pytest (all, cpu+cuda)"
[ $kernels = 1 ] && label="pytest (kernels, cuda)"
row "$label" "$(status_of $rc)" "$(tail -n 1 "$out/pytest.log")"
[ -f "$out/pytest.xml" ] && "$py" - "$out/pytest.xml" >"$out/pytest-cuda.txt" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET

counts = {"passed": 0, "failed": 0, "skipped": 0}
for case in ET.parse(sys.argv[1]).iter("testcase"):
    if "cuda" not in case.get("name", ""):
        continue
    if case.find("failure") is not None or case.find("error") is not None:
        counts["failed"] += 1
    elif case.find("skipped") is not None:
        counts["skipped"] += 1
    else:
        counts["passed"] += 1
print(", ".join(f"{v} {k}" for k, v in counts.items()))
PYEOF
row "  CUDA cases" "" "$(cat "$out/pytest-cuda.txt" 2>/dev/null)"
rm -f "$out/pytest.xml" "$out/pytest-cuda.txt"
grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -n 30

# 2b. The CUDA tests of the paths the defaults do not take, each setting in its own process (a
#     kernel that traps takes its CUDA context down with it).
cuda_pass() {  # label, log name, seconds, VAR=value, test files...
  local label=$1 log="$out/pytest-$2.log" limit=$3 setting=$4
  shift 4
  (
    export "${setting?}"
    limited "$limit" "$py" -m pytest "$@" -q -k cuda $(timeout_opt 60) -p no:cacheprovider -rfEs
  ) >"$log" 2>&1
  local rc=$?
  row "$label" "$(status_of $rc)" "$(tail -n 1 "$log")"
  grep -E "^(FAILED|ERROR)" "$log" | head -n 10
}
# Attention on its CUDA-core kernels alone, as on GPUs whose blocks cannot hold the tensor-core
# kernels' shared memory (sm_86/sm_89 at head size 128).
cuda_pass "pytest attention, no tensor cores" attention-simt 90 \
  APHRODITE_CUDA_ATTENTION_TENSOR_CORES=0 tests/python/test_attention.py
# The GEMM kernels other than the default ("auto": the decode-sized kernel for M <= 16, wgmma
# above, the projector on them; the model's layers on cuBLAS): "wgmma" for every shape, "mma"
# (the mma.sync tiled kernel, as on GPUs before Hopper) and "auto" for the model's own layers too
# (the model tests then decode, and capture CUDA graphs, on these kernels instead of cuBLAS).
cuda_pass "pytest GEMM=wgmma (cuda)" gemm-wgmma 90 APHRODITE_CUDA_GEMM=wgmma \
  tests/python/test_linear.py tests/python/test_projector.py
cuda_pass "pytest GEMM=mma (cuda)" gemm-mma 90 APHRODITE_CUDA_GEMM=mma \
  tests/python/test_linear.py tests/python/test_projector.py
# Each wgmma tiling forced (the clustered ones included), off its tile edges.
cuda_pass "pytest wgmma tilings forced" wgmma-tilings 90 APHRODITE_CUDA_GEMM=wgmma "$forced"
[ $kernels = 1 ] || cuda_pass "pytest GEMM=auto, layers (cuda)" gemm-auto 150 \
  APHRODITE_CUDA_GEMM=auto tests/python/test_llava_model.py tests/python/test_cuda_graphs.py

# 3. Benchmarks: ours against torch / HF on the GPU in the same process, then the host CPU's.
bench() {  # name, time limit, command...
  local name=$1 limit=$2 rc
  shift 2
  limited "$limit" "$@" >"$out/bench-one.txt" 2>&1
  rc=$?
  row "$name" "$(status_of $rc)" "$(tail -n 1 "$out/bench-one.txt")"
  { echo "--- $name: $*"; cat "$out/bench-one.txt"; } >>"$out/bench.txt"
  rm -f "$out/bench-one.txt"
}
if [ $quick = 0 ]; then
  # The GPU's own figures first (the issues' targets), the host CPU's last.
  bench bench_attention_cuda 180 "$py" benchmarks/bench_attention.py --device cuda
  bench bench_projector_cuda 120 "$py" benchmarks/bench_projector.py --device cuda
  # Each wgmma tiling forced at the large projector shapes (the tiling model's calibration).
  [ $kernels = 1 ] && bench bench_projector_tilings 120 "$py" benchmarks/bench_projector.py \
    --device cuda --tilings --repeats 5
  [ $kernels = 1 ] && exit 0
  bench bench_projector_cuda_gemm_mma 120 env APHRODITE_CUDA_GEMM=mma \
    "$py" benchmarks/bench_projector.py --device cuda
  bench offline_throughput_cuda 240 "$py" benchmarks/offline_throughput.py --device cuda \
    --dtype bfloat16
  bench offline_throughput_cuda_gemm_auto 120 env APHRODITE_CUDA_GEMM=auto \
    "$py" benchmarks/offline_throughput.py --device cuda --dtype bfloat16
  for bin in "$bench_bins"/bench_*; do
    [ -x "$bin" ] || continue
    case $(basename "$bin") in
      # The host scheduler's cost, one load of 1,024 sequences (its full sweep, up to 8,192
      # sequences, takes minutes to warm up; BENCHMARKS.md has it from the development machine).
      bench_scheduler) bench bench_scheduler 60 env BENCH_ONLY=1024 "$bin" 200 1 ;;
      *) bench "$(basename "$bin")" 120 "$bin" ;;
    esac
  done
  bench bench_vision_cpu 120 "$py" benchmarks/bench_vision.py --images 16 --repeats 1
fi

