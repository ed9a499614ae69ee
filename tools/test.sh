#!/usr/bin/env bash
# Runs every test: the C++ unit tests (debug build with AddressSanitizer and UBSan, through
# ctest), the out-of-tree C++ example against the installed library, and the Python tests
# against the installed package. Usage: bash tools/test.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD
jobs=$(nproc)

echo "== C++ unit tests (Debug, ASan+UBSan, CPU backend) =="
cmake -S . -B build/cpp-tests -G Ninja \
  -DCMAKE_BUILD_TYPE=Debug \
  -DAPHRODITE_BUILD_TESTS=ON \
  -DAPHRODITE_BUILD_PYTHON=OFF \
  -DAPHRODITE_CUDA=OFF \
  -DAPHRODITE_SANITIZE=ON \
  -DAPHRODITE_WERROR=ON \
  -DCMAKE_INSTALL_PREFIX="$root/build/cpp-install" >/dev/null
cmake --build build/cpp-tests -j "$jobs"
ctest --test-dir build/cpp-tests --output-on-failure -j "$jobs"

echo "== C++ example against the installed library (find_package(Aphrodite)) =="
cmake --install build/cpp-tests --component cpp >/dev/null
cmake -S examples/cpp_consumer -B build/example -G Ninja \
  -DCMAKE_PREFIX_PATH="$root/build/cpp-install" >/dev/null
cmake --build build/example -j "$jobs"
build/example/aphrodite_consumer

echo "== Python tests =="
"${PYTHON:-python3}" -m pytest tests/python "$@"
