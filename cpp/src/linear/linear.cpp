// aphrodite::linear: argument checks and dispatch to the CPU GEMM or the CUDA kernels.
#include "aphrodite/linear.h"

#include <cstring>
#include <string>

#include "aphrodite/backend.h"
#include "linear/gemm_cpu.h"

#ifdef APHRODITE_WITH_CUDA
#include "internal/linear_cuda.h"
#endif

namespace aphrodite {

namespace {

void check_matrix(const TensorView& t, const char* name) {
  check_dim(t, name, 2);
  check_last_dim_contiguous(t, name);
  if (t.size(0) > 1 && t.stride(0) < t.size(1)) {
    throw ValueError(std::string(name) + " must have rows that do not overlap (row stride >= " +
                     "columns), got " + t.describe());
  }
}

// Shapes and layouts shared by both overloads; the weight's shape is (n, k).
void check_linear_args(const TensorView& out, const TensorView& x, std::int64_t n, std::int64_t k,
                       const std::optional<TensorView>& bias, Activation act) {
  check_matrix(x, "x");
  check_matrix(out, "out");
  if (x.size(1) != k) {
    throw ValueError("x must have " + std::to_string(k) +
                     " columns (the weight's in_features), got " + x.describe());
  }
  if (act == Activation::kSwiGlu && n % 2 != 0) {
    throw ValueError("activation 'swiglu' needs a weight with an even number of rows (gate over " +
                     std::string("up), got ") + std::to_string(n));
  }
  check_shape(out, "out", {x.size(0), act == Activation::kSwiGlu ? n / 2 : n});
  check_same_device(out, "out", x, "x");
  if (bias) {
    check_shape(*bias, "bias", {n});
    check_contiguous(*bias, "bias");
    check_same_device(*bias, "bias", x, "x");
  }
}

void check_cpu_float32(const TensorView& t, const char* name) {
  check_dtype(t, name, {DType::kFloat32});
}

}  // namespace

const char* activation_name(Activation act) {
  switch (act) {
    case Activation::kNone:
      return "none";
    case Activation::kGeluErf:
      return "gelu";
    case Activation::kGeluTanh:
      return "gelu_tanh";
    case Activation::kSwiGlu:
      return "swiglu";
    case Activation::kQuickGelu:
      return "quick_gelu";
  }
  return "unknown";
}

Activation parse_activation(const char* name) {
  if (name == nullptr) {
    throw ValueError(
        "activation must be one of 'none', 'gelu', 'gelu_tanh', 'swiglu', 'quick_gelu', got null");
  }
  for (Activation act : {Activation::kNone, Activation::kGeluErf, Activation::kGeluTanh,
                         Activation::kSwiGlu, Activation::kQuickGelu}) {
    if (std::strcmp(name, activation_name(act)) == 0) return act;
  }
  throw ValueError(
      std::string(
          "activation must be one of 'none', 'gelu', 'gelu_tanh', 'swiglu', 'quick_gelu', got '") +
      name + "'");
}

void set_linear_cpu_isa(const char* name) {
  detail::set_active_cpu_isa(detail::parse_cpu_isa(name));
}

const char* linear_cpu_isa() { return detail::cpu_isa_name(detail::active_cpu_isa()); }

void linear(const TensorView& out, const TensorView& x, const TensorView& weight,
            const std::optional<TensorView>& bias, Activation act, StreamHandle stream) {
  check_matrix(weight, "weight");
  check_linear_args(out, x, weight.size(0), weight.size(1), bias, act);
  check_same_device(weight, "weight", x, "x");
  // The kernels write `out` tile by tile while still reading the inputs: no in-place linear.
  check_no_overlap(out, "out", x, "x");
  check_no_overlap(out, "out", weight, "weight");
  if (bias) check_no_overlap(out, "out", *bias, "bias");
  backend_for(x.device());

  if (x.device().is_cpu()) {
    check_cpu_float32(x, "x");
    check_cpu_float32(weight, "weight");
    check_cpu_float32(out, "out");
    if (bias) check_cpu_float32(*bias, "bias");
    detail::GemmF32Args args{};
    args.a = x.data_as<const float>();
    args.lda = x.stride(0);
    args.w = weight.data_as<const float>();
    args.ldw = weight.stride(0);
    args.bias = bias ? bias->data_as<const float>() : nullptr;
    args.c = out.data_as<float>();
    args.ldc = out.stride(0);
    args.m = x.size(0);
    args.n = weight.size(0);
    args.k = weight.size(1);
    args.act = act;
    detail::gemm_f32(args, detail::active_cpu_isa());
    return;
  }

  if (act == Activation::kSwiGlu) {
    throw ValueError("activation 'swiglu' is implemented for CPU tensors only");
  }
#ifdef APHRODITE_WITH_CUDA
  check_dtype(x, "x", {DType::kFloat16, DType::kBFloat16});
  check_dtype(weight, "weight", {x.dtype()});
  check_dtype(out, "out", {x.dtype()});
  if (bias) check_dtype(*bias, "bias", {x.dtype()});
  detail::LinearCudaArgs args{};
  args.out = out.data();
  args.ldo = out.stride(0);
  args.x = x.data();
  args.ldx = x.stride(0);
  args.w = weight.data();
  args.ldw = weight.stride(0);
  args.bias = bias ? bias->data() : nullptr;
  args.m = x.size(0);
  args.n = weight.size(0);
  args.k = weight.size(1);
  args.dtype = x.dtype();
  args.act = act;
  args.device = x.device().index;
  args.stream = stream;
  detail::linear_cuda(args);
#else
  (void)stream;
#endif
}

PackedWeight pack_linear_weight(const TensorView& weight, bool gated) {
  check_matrix(weight, "weight");
  check_device(weight, "weight", Device::cpu());
  check_cpu_float32(weight, "weight");
  const std::int64_t n = weight.size(0), k = weight.size(1);
  if (gated && n % 2 != 0) {
    throw ValueError("a gated weight stacks gate over up rows and needs an even number of rows, " +
                     std::string("got ") + weight.describe());
  }
  const std::int64_t panels = detail::packed_panels(n, gated);
  PackedWeight packed;
  packed.storage_ = Buffer::allocate(
      static_cast<std::size_t>(panels * k * detail::kGemmNr) * sizeof(float), Device::cpu());
  packed.out_features_ = n;
  packed.in_features_ = k;
  packed.gated_ = gated;
  detail::pack_weight_f32(weight.data_as<const float>(), weight.stride(0), n, k, gated,
                          static_cast<float*>(packed.storage_->data()), detail::active_cpu_isa());
  return packed;
}

void linear(const TensorView& out, const TensorView& x, const PackedWeight& weight,
            const std::optional<TensorView>& bias, Activation act) {
  if (weight.empty())
    throw ValueError("weight is an empty PackedWeight (not built by pack_linear_weight)");
  if (weight.gated() != (act == Activation::kSwiGlu)) {
    throw ValueError(
        weight.gated() ? "weight was packed gated (for 'swiglu') but the activation is '" +
                             std::string(activation_name(act)) + "'"
                       : std::string("activation 'swiglu' needs a weight packed with gated=True"));
  }
  check_linear_args(out, x, weight.out_features(), weight.in_features(), bias, act);
  check_device(x, "x", Device::cpu());
  check_no_overlap(out, "out", x, "x");
  if (bias) check_no_overlap(out, "out", *bias, "bias");
  check_cpu_float32(x, "x");
  check_cpu_float32(out, "out");
  if (bias) check_cpu_float32(*bias, "bias");
  detail::GemmF32Args args{};
  args.a = x.data_as<const float>();
  args.lda = x.stride(0);
  args.packed_w = weight.data();
  args.bias = bias ? bias->data_as<const float>() : nullptr;
  args.c = out.data_as<float>();
  args.ldc = out.stride(0);
  args.m = x.size(0);
  args.n = weight.out_features();
  args.k = weight.in_features();
  args.act = act;
  detail::gemm_f32(args, detail::active_cpu_isa());
}

}  // namespace aphrodite
