// The Hopper (sm_90a) path of the CUDA linear: wgmma fed by TMA (linear_sm90.cu).
#pragma once

#include <string>

#include "internal/linear_cuda.h"

namespace aphrodite::detail {

// Whether the wgmma kernel can run on `device`: a compute capability 9.0 GPU and a build with
// sm_90a code. If not and why is given, *why says what is missing.
bool wgmma_supported(int device, std::string* why);

// Queues the wgmma kernel for args on args.stream. Preconditions: those of linear.cu's tiled
// kernel (K, the row strides a multiple of 8 elements, x and w 16-byte aligned), K > 0, M at most
// 65535 * 128, and wgmma_supported(args.device).
void linear_wgmma(const LinearCudaArgs& args);

}  // namespace aphrodite::detail
