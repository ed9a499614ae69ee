// Internal bridge between the layer ops' argument checks (layers/layer_ops.cpp) and their CPU and
// CUDA kernels; arguments are validated by the caller.
#pragma once

#include <cstdint>

#include "aphrodite/tensor.h"

namespace aphrodite::detail {

struct RmsNormParams {
  void* out = nullptr;  // [rows, hidden], row stride out_stride (== x with a residual)
  std::int64_t out_stride = 0;
  const void* x = nullptr;
  std::int64_t x_stride = 0;
  void* residual = nullptr;  // nullptr: plain RMSNorm; else residual = x + residual first
  std::int64_t residual_stride = 0;
  const void* weight = nullptr;  // [hidden]
  std::int64_t rows = 0;
  std::int64_t hidden = 0;
  float eps = 0.0f;
  DType dtype = DType::kFloat32;
};

struct RotaryParams {
  const void* positions = nullptr;  // [tokens]
  bool positions_int64 = true;
  void* query = nullptr;  // [tokens, num_heads, head_size]
  std::int64_t query_stride = 0;
  void* key = nullptr;  // [tokens, num_kv_heads, head_size]
  std::int64_t key_stride = 0;
  const float* cos = nullptr;  // [max_positions, head_size]
  const float* sin = nullptr;
  std::int64_t tokens = 0;
  std::int64_t max_positions = 0;
  int num_heads = 0;
  int num_kv_heads = 0;
  int head_size = 0;
  DType dtype = DType::kFloat32;
};

struct SiluAndMulParams {
  void* out = nullptr;  // [rows, n]
  std::int64_t out_stride = 0;
  const void* x = nullptr;  // [rows, 2n]
  std::int64_t x_stride = 0;
  std::int64_t rows = 0;
  std::int64_t n = 0;
  DType dtype = DType::kFloat32;
};

void rms_norm_cpu(const RmsNormParams& p);
void rotary_embedding_cpu(const RotaryParams& p);
void silu_and_mul_cpu(const SiluAndMulParams& p);

#ifdef APHRODITE_WITH_CUDA
void rms_norm_cuda(const RmsNormParams& p, int device, StreamHandle stream);
void rotary_embedding_cuda(const RotaryParams& p, int device, StreamHandle stream);
void silu_and_mul_cuda(const SiluAndMulParams& p, int device, StreamHandle stream);
#endif

}  // namespace aphrodite::detail
