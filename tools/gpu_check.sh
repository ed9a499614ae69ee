#!/usr/bin/env bash
# GPU check for a fresh H100/H200 machine with no network (nvcc, cmake, ninja, pybind11,
# scikit-build-core, torch and transformers present). Builds the package for sm_90a, runs every
# test on CUDA (the same tests as on the CPU, parametrised by device), every C++ benchmark binary
# and the Python benchmarks on the GPU, then prints one compact table. Logs go to $OUT (or
# build/gpu-check). Usage: bash tools/gpu_check.sh [--quick]   (quick: tests only)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/gpu-check}
mkdir -p "$out"
py=${PYTHON:-python3}
quick=0
[ "${1:-}" = "--quick" ] && quick=1
export PYTHONUNBUFFERED=1
declare -a rows
row() { rows+=("$(printf '%-34s %-8s %s' "$1" "$2" "$3")"); }
t0=$(date +%s)

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"

# 1. Build and install (sm_90a only: the machine's architecture), benchmarks included.
if "$py" -m pip install -v --no-build-isolation --no-deps . \
     -Ccmake.define.APHRODITE_CUDA=ON -Ccmake.define.APHRODITE_CUDA_ARCHS=90a-real \
     -Ccmake.define.APHRODITE_BUILD_BENCHMARKS=ON -Ccmake.define.APHRODITE_WERROR=ON \
     -Cbuild-dir=build/gpu >"$out/build.log" 2>&1; then
  row "build (sm_90a)" PASS "$(( $(date +%s) - t0 ))s"
else
  row "build (sm_90a)" FAIL "see build.log"
  tail -n 60 "$out/build.log"
  printf '%s\n' "${rows[@]}"
  exit 1
fi
"$py" -m aphrodite.env | tee "$out/env.txt"

# 2. Every Python test; CUDA cases run because a GPU is present.
"$py" -m pytest tests/python -q -x --timeout=300 -p no:cacheprovider -rs \
  --junitxml="$out/pytest.xml" >"$out/pytest.log" 2>&1
rc=$?
summary=$(tail -n 1 "$out/pytest.log")
row "pytest (all, cpu+cuda)" "$([ $rc = 0 ] && echo PASS || echo FAIL)" "$summary"
cuda_cases=$(grep -c 'name="[^"]*cuda[^"]*"' "$out/pytest.xml" 2>/dev/null || echo 0)
row "  of which CUDA cases" "" "$cuda_cases"
[ $rc = 0 ] || grep -E "^(FAILED|ERROR)" "$out/pytest.log" | head -n 20

# 3. Benchmarks.
if [ $quick = 0 ]; then
  for bin in build/gpu/benchmarks/cpp/bench_*; do
    [ -x "$bin" ] || continue
    name=$(basename "$bin")
    if timeout 120 "$bin" >"$out/$name.txt" 2>&1; then
      row "$name" PASS "$(tail -n 1 "$out/$name.txt")"
    else
      row "$name" FAIL "$(tail -n 1 "$out/$name.txt")"
    fi
  done
  for script in benchmarks/bench_*.py; do
    [ -f "$script" ] || continue
    name=$(basename "$script" .py)
    if timeout 180 "$py" "$script" --device cuda >"$out/$name.txt" 2>&1; then
      row "$name (cuda)" PASS "$(tail -n 1 "$out/$name.txt")"
    else
      row "$name (cuda)" FAIL "$(tail -n 1 "$out/$name.txt")"
    fi
  done
fi

echo
echo "== GPU check: $(cat "$out/gpu.txt") in $(( $(date +%s) - t0 ))s =="
printf '%s\n' "${rows[@]}"
for f in "$out"/bench_*.txt; do
  [ -f "$f" ] || continue
  echo "--- $(basename "$f")"
  tail -n 15 "$f"
done
