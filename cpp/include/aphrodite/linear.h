// Linear layers: y = act(x @ W^T + b), with W in torch's layout [out_features, in_features].
//
// CPU: float32, a blocked multi-threaded GEMM (AVX-512 or AVX2/FMA micro-kernels when the CPU
// has them, portable ones otherwise, chosen at run time) whose epilogue adds the bias and applies
// the activation while the output tile is still in registers. CUDA: float16/bfloat16 inputs and
// outputs with float32 accumulation on the tensor cores, same fused epilogue (not SwiGLU).
//
// Weights may be packed once at load time (pack_linear_weight) into the panel layout the CPU
// kernel reads, which removes the per-call packing and makes few-row (decode) calls stream each
// weight byte once, N split across the threads.
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
  // SwiGLU (Llama's MLP): the weight [2I, K] stacks the gate rows over the up rows (the bias, if
  // any, likewise), and out[M, I] = silu(x @ Wg^T + bg) * (x @ Wu^T + bu), computed in one pass
  // over x. CPU only.
  kSwiGlu,
  // CLIP's quick GELU: x * sigmoid(1.702 * x) (HF's "quick_gelu").
  kQuickGelu,
};

// "none", "gelu", "gelu_tanh", "swiglu", "quick_gelu": the names the Python API uses.
const char* activation_name(Activation act);
// Inverse of activation_name; throws ValueError naming the accepted names.
Activation parse_activation(const char* name);

// out[M, N] = act(x[M, K] @ weight[N, K]^T + bias[N]); with kSwiGlu, out is [M, N / 2] (N even).
// x and out: 2-D, innermost dimension dense (rows may be strided), not overlapping.
// weight: 2-D [N, K], innermost dimension dense. bias: 1-D [N], contiguous, or absent.
// CPU: all float32. CUDA: all float16 or all bfloat16, on one device; runs on `stream`.
//
// On CPU the kernels are chosen at run time: AVX-512 (F/BW/DQ/VL) when the CPU has it, else
// AVX2/FMA, else portable C++. The environment variable APHRODITE_CPU_ISA=avx512|avx2|scalar,
// read at the first call, or set_linear_cpu_isa() below, selects a kernel set explicitly.
void linear(const TensorView& out, const TensorView& x, const TensorView& weight,
            const std::optional<TensorView>& bias, Activation act = Activation::kNone,
            StreamHandle stream = 0);

// Forces the CPU kernel set: "avx512", "avx2", "scalar", or "auto" (the best the CPU runs).
// Throws ValueError for an unknown name or a set this CPU cannot run. For tests and benchmarks;
// not synchronised with calls running on other threads.
void set_linear_cpu_isa(const char* name);
// The kernel set CPU calls use now: "avx512", "avx2" or "scalar".
const char* linear_cpu_isa();

// A float32 CPU weight [N, K] repacked into the panel layout of the CPU GEMM: N split into
// panels of kPanelWidth output features (the last one zero-padded); inside a panel the values
// are ordered by k, then by feature. A gated weight (for kSwiGlu) orders its panels as gate
// panel 0, up panel 0, gate panel 1, ... Immutable once built; cheap to copy (shared storage).
class PackedWeight {
 public:
  static constexpr std::int64_t kPanelWidth = 16;

  PackedWeight() = default;
  std::int64_t out_features() const { return out_features_; }
  std::int64_t in_features() const { return in_features_; }
  // Packed for kSwiGlu (gate and up panels interleaved); only usable with that activation.
  bool gated() const { return gated_; }
  bool empty() const { return storage_ == nullptr; }
  // Panel p starts at data() + p * in_features() * kPanelWidth.
  const float* data() const { return static_cast<const float*>(storage_->data()); }

 private:
  friend PackedWeight pack_linear_weight(const TensorView& weight, bool gated);
  std::shared_ptr<Buffer> storage_;
  std::int64_t out_features_ = 0;
  std::int64_t in_features_ = 0;
  bool gated_ = false;
};

// Packs a float32 CPU weight [N, K] (innermost dimension dense) for linear() below; `gated`:
// for kSwiGlu, the weight stacking gate over up rows (N even).
PackedWeight pack_linear_weight(const TensorView& weight, bool gated = false);

// As linear() above with a packed weight; CPU and float32 only.
void linear(const TensorView& out, const TensorView& x, const PackedWeight& weight,
            const std::optional<TensorView>& bias, Activation act = Activation::kNone);

}  // namespace aphrodite
