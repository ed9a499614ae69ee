// Internal bridge between aphrodite::linear and its CUDA kernels (cuda/linear.cu). Only
// compiled when the core is built with APHRODITE_WITH_CUDA; arguments are validated by the
// caller.
#pragma once

#include <cstdint>

#include "aphrodite/linear.h"
#include "aphrodite/tensor.h"

namespace aphrodite::detail {

struct LinearCudaArgs {
  void* out;
  std::int64_t ldo;
  const void* x;
  std::int64_t ldx;
  const void* w;  // [N, K]
  std::int64_t ldw;
  const void* bias;  // [N] or nullptr
  std::int64_t m, n, k;
  DType dtype;  // kFloat16 or kBFloat16, for every tensor
  Activation act;
  int device;
  StreamHandle stream;
};

// out = act(x @ w^T + bias) on the tensor cores (float32 accumulation), queued on args.stream.
void linear_cuda(const LinearCudaArgs& args);

}  // namespace aphrodite::detail
