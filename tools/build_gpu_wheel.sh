#!/usr/bin/env bash
# Builds, on this (GPU-less) machine, what tools/gpu_check.sh would otherwise build on the GPU
# machine: a wheel for the GPU machine's Python (default 3.12, sm_90a, benchmarks included) in
# build/gpu-wheel/, with the C++ benchmark binaries in build/gpu-wheel/bin/. Carry build/gpu-wheel
# with the device call to save its build minutes. Usage: bash tools/build_gpu_wheel.sh [python]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-/work/venvs/py312/bin/python}
rm -rf build/gpu-wheel
mkdir -p build
"$py" -m pip wheel -v --no-build-isolation --no-deps . -w build/gpu-wheel \
  -Ccmake.define.APHRODITE_CUDA=ON -Ccmake.define.APHRODITE_CUDA_ARCHS=90a-real \
  -Ccmake.define.APHRODITE_BUILD_BENCHMARKS=ON -Ccmake.define.APHRODITE_WERROR=ON \
  -Cbuild-dir=build/gpu-prebuild >build/gpu-wheel.log 2>&1 || { tail -n 50 build/gpu-wheel.log; exit 1; }
mkdir -p build/gpu-wheel/bin
cp build/gpu-prebuild/benchmarks/cpp/bench_* build/gpu-wheel/bin/ 2>/dev/null || true
git rev-parse HEAD >build/gpu-wheel/COMMIT
git status --porcelain >>build/gpu-wheel/COMMIT
ls -la build/gpu-wheel build/gpu-wheel/bin
