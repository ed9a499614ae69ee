// Argument checks and backend dispatch for the layer ops (aphrodite/layer_ops.h).
#include "aphrodite/layer_ops.h"

#include <cmath>
#include <string>

#include "aphrodite/backend.h"
#include "internal/layer_ops_kernels.h"

namespace aphrodite {

namespace {

constexpr std::initializer_list<DType> kFloatTypes = {DType::kFloat32, DType::kFloat16,
                                                      DType::kBFloat16};

// [rows, cols] with dense rows; any row stride that keeps rows apart.
void check_rows(const TensorView& t, const char* name) {
  check_dim(t, name, 2);
  check_last_dim_contiguous(t, name);
  if (t.size(0) > 1 && t.stride(0) < t.size(1)) {
    throw ValueError(std::string(name) + " rows overlap: row stride " +
                     std::to_string(t.stride(0)) + " is below the row length in " + t.describe());
  }
}

void check_eps(float eps) {
  if (!(eps >= 0.0f) || std::isinf(eps)) {
    throw ValueError("eps must be a finite number >= 0, got " + std::to_string(eps));
  }
}

void check_norm_args(const TensorView& x, const char* x_name, const TensorView& weight) {
  check_dtype(x, x_name, kFloatTypes);
  check_rows(x, x_name);
  check_same_device(x, x_name, weight, "weight");
  check_same_dtype(weight, "weight", x, x_name);
  check_contiguous(weight, "weight");
  check_shape(weight, "weight", {x.size(1)});
}

// Normalises the rows of x into out (the same tensor for the in-place fused form), after adding
// the rows of `residual` when it is given.
void run_rms_norm(const TensorView& out, const TensorView& x, const TensorView* residual,
                  const TensorView& weight, float eps, StreamHandle stream) {
  detail::RmsNormParams p;
  p.out = out.data();
  p.out_stride = out.stride(0);
  p.x = x.data();
  p.x_stride = x.stride(0);
  if (residual != nullptr) {
    p.residual = residual->data();
    p.residual_stride = residual->stride(0);
  }
  p.weight = weight.data();
  p.rows = x.size(0);
  p.hidden = x.size(1);
  p.eps = eps;
  p.dtype = x.dtype();
  const Device device = x.device();
  backend_for(device);
  if (p.rows == 0 || p.hidden == 0) return;
  if (device.is_cpu()) {
    detail::rms_norm_cpu(p);
    return;
  }
#ifdef APHRODITE_WITH_CUDA
  detail::rms_norm_cuda(p, device.index, stream);
#else
  (void)stream;
#endif
}

}  // namespace

void rms_norm(const TensorView& out, const TensorView& x, const TensorView& weight, float eps,
              StreamHandle stream) {
  check_norm_args(x, "x", weight);
  check_same_device(x, "x", out, "out");
  check_same_dtype(out, "out", x, "x");
  check_rows(out, "out");
  check_shape(out, "out", {x.size(0), x.size(1)});
  check_eps(eps);
  check_no_overlap(out, "out", x, "x", /*same_ok=*/true);  // in place, or apart
  check_no_overlap(out, "out", weight, "weight");
  run_rms_norm(out, x, nullptr, weight, eps, stream);
}

void fused_add_rms_norm(const TensorView& x, const TensorView& residual, const TensorView& weight,
                        float eps, StreamHandle stream) {
  check_norm_args(x, "x", weight);
  check_same_device(x, "x", residual, "residual");
  check_same_dtype(residual, "residual", x, "x");
  check_rows(residual, "residual");
  check_shape(residual, "residual", {x.size(0), x.size(1)});
  check_eps(eps);
  if (x.data() == residual.data() && x.numel() > 0) {
    throw ValueError("fused_add_rms_norm: x and residual must be different tensors");
  }
  check_no_overlap(x, "x", residual, "residual");
  check_no_overlap(x, "x", weight, "weight");
  check_no_overlap(residual, "residual", weight, "weight");
  run_rms_norm(x, x, &residual, weight, eps, stream);
}

void rotary_embedding(const TensorView& positions, const TensorView& query, const TensorView& key,
                      const TensorView& cos, const TensorView& sin, StreamHandle stream) {
  const Device device = query.device();
  check_same_device(query, "query", positions, "positions");
  check_same_device(query, "query", key, "key");
  check_same_device(query, "query", cos, "cos");
  check_same_device(query, "query", sin, "sin");
  check_dtype(query, "query", kFloatTypes);
  check_same_dtype(key, "key", query, "query");
  check_dtype(positions, "positions", {DType::kInt64, DType::kInt32});
  check_dtype(cos, "cos", {DType::kFloat32});
  check_dtype(sin, "sin", {DType::kFloat32});
  check_token_major(query, "query");
  check_token_major(key, "key");
  const std::int64_t tokens = query.size(0);
  const std::int64_t head_size = query.size(2);
  check_shape(key, "key", {tokens, -1, head_size});
  check_shape(positions, "positions", {tokens});
  check_contiguous(positions, "positions");
  check_dim(cos, "cos", 2);
  check_contiguous(cos, "cos");
  check_shape(cos, "cos", {-1, head_size});
  check_shape(sin, "sin", {cos.size(0), head_size});
  check_contiguous(sin, "sin");
  if (head_size % 2 != 0) {
    throw ValueError("rotary_embedding needs an even head_size, got " + query.describe());
  }
  // Rotated in place: query and key may be slices of one QKV buffer, but not share elements.
  check_no_overlap(query, "query", key, "key");
  for (const TensorView* t : {&query, &key}) {
    const char* name = t == &query ? "query" : "key";
    check_no_overlap(*t, name, positions, "positions");
    check_no_overlap(*t, name, cos, "cos");
    check_no_overlap(*t, name, sin, "sin");
  }
  detail::RotaryParams p;
  p.positions = positions.data();
  p.positions_int64 = positions.dtype() == DType::kInt64;
  p.query = query.data();
  p.query_stride = query.stride(0);
  p.key = key.data();
  p.key_stride = key.stride(0);
  p.cos = cos.data_as<const float>();
  p.sin = sin.data_as<const float>();
  p.tokens = tokens;
  p.max_positions = cos.size(0);
  p.num_heads = static_cast<int>(query.size(1));
  p.num_kv_heads = static_cast<int>(key.size(1));
  p.head_size = static_cast<int>(head_size);
  p.dtype = query.dtype();
  backend_for(device);
  if (tokens == 0 || head_size == 0) return;
  if (device.is_cpu()) {
    detail::rotary_embedding_cpu(p);
    return;
  }
#ifdef APHRODITE_WITH_CUDA
  detail::rotary_embedding_cuda(p, device.index, stream);
#else
  (void)stream;
#endif
}

void silu_and_mul(const TensorView& out, const TensorView& x, StreamHandle stream) {
  const Device device = x.device();
  check_same_device(x, "x", out, "out");
  check_dtype(x, "x", kFloatTypes);
  check_same_dtype(out, "out", x, "x");
  check_rows(x, "x");
  check_rows(out, "out");
  if (x.size(1) % 2 != 0) {
    throw ValueError("silu_and_mul needs x with an even last dimension (gate and up halves), got " +
                     x.describe());
  }
  check_shape(out, "out", {x.size(0), x.size(1) / 2});
  check_no_overlap(out, "out", x, "x");
  detail::SiluAndMulParams p;
  p.out = out.data();
  p.out_stride = out.stride(0);
  p.x = x.data();
  p.x_stride = x.stride(0);
  p.rows = x.size(0);
  p.n = x.size(1) / 2;
  p.dtype = x.dtype();
  backend_for(device);
  if (p.rows == 0 || p.n == 0) return;
  if (device.is_cpu()) {
    detail::silu_and_mul_cpu(p);
    return;
  }
#ifdef APHRODITE_WITH_CUDA
  detail::silu_and_mul_cuda(p, device.index, stream);
#else
  (void)stream;
#endif
}

}  // namespace aphrodite
