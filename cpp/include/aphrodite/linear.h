// Linear layers: y = act(x @ W^T + b), with W in torch's layout [out_features, in_features].
//
// CPU: float32, a blocked multi-threaded GEMM (AVX2/FMA micro-kernel when the CPU has it, a
// portable one otherwise, chosen at run time) whose epilogue adds the bias and applies the
// activation while the output tile is still in registers. CUDA: float16/bfloat16 inputs and
// outputs with float32 accumulation on the tensor cores, same fused epilogue.
//
// Weights may be packed once at load time (pack_linear_weight) into the panel layout the CPU
// kernel reads, which removes the per-call packing and makes few-row (decode) calls cheap.
#pragma once

#include <cstdint>
#include <memory>
#include <optional>

#include "aphrodite/buffer.h"
#include "aphrodite/tensor.h"

namespace aphrodite {

enum class Activation : std::uint8_t {
  kNone,
  // GELU with the exact erf: 0.5 * x * (1 + erf(x / sqrt(2))) (torch's approximate="none").
  kGeluErf,
  // GELU's tanh approximation (torch's approximate="tanh", HF's "gelu_pytorch_tanh").
  kGeluTanh,
};

// "none", "gelu", "gelu_tanh": the names the Python API uses.
const char* activation_name(Activation act);
// Inverse of activation_name; throws ValueError naming the accepted names.
Activation parse_activation(const char* name);

// out[M, N] = act(x[M, K] @ weight[N, K]^T + bias[N]).
// x and out: 2-D, innermost dimension dense (rows may be strided), not overlapping.
// weight: 2-D [N, K], innermost dimension dense. bias: 1-D [N], contiguous, or absent.
// CPU: all float32. CUDA: all float16 or all bfloat16, on one device; runs on `stream`.
void linear(const TensorView& out, const TensorView& x, const TensorView& weight,
            const std::optional<TensorView>& bias, Activation act = Activation::kNone,
            StreamHandle stream = 0);

// A float32 CPU weight [N, K] repacked into the panel layout of the CPU GEMM: N split into
// panels of kPanelWidth output features (the last one zero-padded); inside a panel the values
// are ordered by k, then by feature. Immutable once built; cheap to copy (shared storage).
class PackedWeight {
 public:
  static constexpr std::int64_t kPanelWidth = 16;

  PackedWeight() = default;
  std::int64_t out_features() const { return out_features_; }
  std::int64_t in_features() const { return in_features_; }
  bool empty() const { return storage_ == nullptr; }
  // Panel p starts at data() + p * in_features() * kPanelWidth.
  const float* data() const { return static_cast<const float*>(storage_->data()); }

 private:
  friend PackedWeight pack_linear_weight(const TensorView& weight);
  std::shared_ptr<Buffer> storage_;
  std::int64_t out_features_ = 0;
  std::int64_t in_features_ = 0;
};

// Packs a float32 CPU weight [N, K] (innermost dimension dense) for linear() below.
PackedWeight pack_linear_weight(const TensorView& weight);

// As linear() above with a packed weight; CPU and float32 only.
void linear(const TensorView& out, const TensorView& x, const PackedWeight& weight,
            const std::optional<TensorView>& bias, Activation act = Activation::kNone);

}  // namespace aphrodite
