// The Hopper (sm_90a) path of the CUDA linear: wgmma fed by TMA (linear_sm90.cu).
#pragma once

#include "internal/linear_cuda.h"

namespace aphrodite::detail {

// Whether linear_cuda should run args on the wgmma kernel. APHRODITE_CUDA_GEMM picks the
// tensor-core GEMM: "mma" (mma.sync, the default while the wgmma kernel has not yet been seen
// passing on a GPU) or "wgmma". Asking for wgmma where it cannot run (a build without sm_90a
// code, a device other than compute capability 9.0) is a DeviceError, never a silent fallback;
// inputs outside the kernel's preconditions (those of linear.cu's tiled kernel, and K > 0)
// still take the other kernels. Any other value is a ValueError.
bool use_wgmma_linear(const LinearCudaArgs& args, bool tiled);

// Queues the wgmma kernel for args (preconditions as above) on args.stream.
void linear_wgmma(const LinearCudaArgs& args);

}  // namespace aphrodite::detail
