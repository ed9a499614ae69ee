#!/usr/bin/env bash
# Nsight Compute profile of aphrodite's CUDA GEMM against torch's (cuBLAS) on the same inputs:
# the second projector GEMM (plain, bf16) at the LLaVA-1.5-7B shape, at 144 tokens and at the two
# small projector shapes of bench_projector.py (or the M x N x K shapes in NCU_SHAPES), ours with
# the tiling the cost model picks and with the tilings named in NCU_TILINGS. For a GPU machine
# whose runtime lets ncu read the hardware counters (Firecracker: see the device library's
# KINDS.md); installs the wheel carried in build/gpu-wheel like tools/gpu_check.sh.
# Usage: [NCU_TILINGS=192x96c2n,...] [NCU_SHAPES=576x4096x4096,...] [NCU_SET=full] bash tools/ncu_gemm.sh
# (report text in $OUT/ncu.txt, or build/ncu/ncu.txt; a summary of it on stdout)
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-build/ncu}
mkdir -p "$out"
py=${PYTHON:-python3}
pytag=$("$py" -c 'import sys; print("cp%d%d" % sys.version_info[:2])')
wheel=$(ls build/gpu-wheel/aphrodite-*-"$pytag"-*.whl 2>/dev/null | head -n 1)
if [ -n "$wheel" ]; then
  "$py" -m pip install -q --no-deps --force-reinstall "$wheel" >"$out/install.log" 2>&1 || exit 1
fi
ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n 1)
[ -n "$ncu" ] || { echo "ncu not found"; exit 1; }
cat >"$out/gemm_calls.py" <<'PYEOF'
"""One call of each GEMM under test, between cudaProfilerStart and Stop (inputs made before)."""
import os
import sys

import torch
import torch.nn.functional as F

from aphrodite import ops

tilings = ["auto"] + [t for t in os.environ.get("NCU_TILINGS", "").split(",") if t]
os.environ["APHRODITE_CUDA_GEMM"] = "wgmma"
cases = []
shapes = os.environ.get("NCU_SHAPES") or "576x4096x4096,144x4096x4096,576x1024x1024,64x512x512"
for shape in shapes.split(","):
    m, n, k = (int(v) for v in shape.split("x"))
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    cases.append((m, n, k, x, w, b))
for _m, _n, _k, x, w, b in cases:  # warm-up: tensor-map encoders, cuBLAS heuristics
    for tiling in tilings:
        os.environ["APHRODITE_CUDA_WGMMA_TILING"] = tiling
        ops.linear(x, w, b)
    F.linear(x, w, b)
torch.cuda.synchronize()
order = []
torch.cuda.profiler.start()
for m, n, k, x, w, b in cases:
    for tiling in tilings:
        os.environ["APHRODITE_CUDA_WGMMA_TILING"] = tiling
        ops.linear(x, w, b)
        order.append(f"ours {tiling} {m}x{n}x{k}")
    F.linear(x, w, b)
    order.append(f"torch {m}x{n}x{k}")
torch.cuda.synchronize()
torch.cuda.profiler.stop()
print("profiled, in order:", "; ".join(order), file=sys.stderr)
PYEOF
# NCU_SET=full: every section with its details (warp stall reasons, pipe utilisation, source
# counters), several times slower; by default the summary sections only.
if [ "${NCU_SET:-}" = full ]; then
  what=(--set full --print-details all)
else
  what=(--section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis
    --section LaunchStats --section Occupancy --section WarpStateStats --section SchedulerStats)
fi
"$ncu" --clock-control none --profile-from-start off --target-processes all "${what[@]}" \
  "$py" "$out/gemm_calls.py" >"$out/ncu.txt" 2>&1
rc=$?
# The figures that say where the time goes, kernel by kernel.
grep -E "profiled, in order|^  [a-zA-Z_].*\(|Duration|Compute \(SM\) Throughput|Memory Throughput|L2 Cache Throughput|DRAM Throughput|L1/TEX Cache Throughput|Executed Ipc Active|Issue Slots Busy|Grid Size|Block Size|Registers Per|Cluster Size|Achieved Occupancy|No Eligible|Warp Cycles Per Issued|Dynamic Shared|Shared Memory Configuration|SM Busy|Mem Busy|Max Bandwidth|Stall|[Tt]ensor|Pipe" \
  "$out/ncu.txt" | cut -c1-150
exit $rc
